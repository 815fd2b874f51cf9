// @jobcast/client: the jobcast WebSocket client. React hooks live in '@jobcast/client/react'.
export * from './protocol.js';
export * from './client.js';
export * from './job.js';
export * from './worker.js';
export { backoffCeiling, backoffDelay, DEFAULT_BACKOFF, type BackoffOptions } from './backoff.js';
export { decodeBinaryFrame, decodeFrame, gunzip, type FramePayload } from './decode.js';
