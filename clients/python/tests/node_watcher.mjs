// A browser-side client for the Python tests: @jobcast/client (the built dist) in Node, watching one
// room and printing each of its events as a JSON line until the job completes.
import WebSocket from 'ws';
import { JobcastClient } from '../../typescript/dist/index.js';

const [url, token, room] = process.argv.slice(2);
const client = new JobcastClient({ url, getToken: async () => token, WebSocket });
client.onRoom(room, (e) => {
  console.log(JSON.stringify({ seq: e.seq, type: e.type }));
  if (e.type === 'processing_completed') {
    client.close();
    process.exit(0);
  }
});
client.connect();
client.subscribe(room).then(() => console.log(JSON.stringify({ subscribed: true })));
setTimeout(() => process.exit(2), 30_000);
