"""A FastAPI app whose background tasks report into jobcast (`uvicorn examples.fastapi_app:app`)."""

from __future__ import annotations

import asyncio
import os

from fastapi import BackgroundTasks, FastAPI  # type: ignore[import-not-found]

from jobcast import AsyncWorkerJob

app = FastAPI()
JOBCAST = os.environ.get("JOBCAST_URL", "http://127.0.0.1:8080")
PUBLISHER_TOKEN = os.environ.get("JOBCAST_PUBLISHER_TOKEN", "")


async def export_report(job: AsyncWorkerJob, pages: int) -> None:
    try:
        for page in range(pages):
            if await job.progress(done=page, total=pages, message=f"page {page + 1} of {pages}"):
                await job.fail("cancelled by the user")
                return
            await asyncio.sleep(0.1)  # the real work
        await job.complete({"pages": pages})
    except Exception as e:  # the job must not stay open: fail it with the reason
        await job.fail(str(e), recoverable=True)
    finally:
        await job.aclose()


@app.post("/reports")
async def start_report(background: BackgroundTasks, pages: int = 20) -> dict[str, str]:
    job = await AsyncWorkerJob.create(JOBCAST, PUBLISHER_TOKEN, kind="report", title=f"{pages}-page report")
    background.add_task(export_report, job, pages)
    return {"job_id": job.job_id, "room": job.room}
