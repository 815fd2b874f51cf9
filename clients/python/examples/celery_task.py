"""A Celery task that reports into jobcast (run a worker with `celery -A examples.celery_task worker`).

The web app creates the job (it holds a publisher token) and passes the job id and job token to the
task; the browser follows `job:<id>` with `@jobcast/client`'s `useJob` hook.
"""

from __future__ import annotations

import os

from celery import Celery  # type: ignore[import-not-found]

from jobcast import WorkerJob

app = Celery("thumbnails", broker=os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0"))
JOBCAST = os.environ.get("JOBCAST_URL", "http://127.0.0.1:8080")


@app.task  # type: ignore[misc]
def resize_photos(job_id: str, job_token: str, photos: list[str]) -> None:
    with WorkerJob(JOBCAST, job_id, job_token) as job:
        job.stage("download", 0.0)
        for i, photo in enumerate(photos):
            ...  # download the photo
            job.stage("download", (i + 1) / len(photos))
        for i, photo in enumerate(photos):
            if job.cancel_requested:
                job.fail("stopped on request")
                return
            ...  # resize it
            job.step(photo, i, "completed")
            job.progress(done=i + 1, total=len(photos), stage="resize", message=f"{photo} resized")
        job.complete({"resized": len(photos)})


def start(publisher_token: str, photos: list[str]) -> str:
    """What the web app does: create the job, queue the task, answer the room to follow."""
    job = WorkerJob.create(JOBCAST, publisher_token, kind="thumbnails", stages=[("download", 1), ("resize", 3)])
    resize_photos.delay(job.job_id, job.token, photos)
    return job.room
