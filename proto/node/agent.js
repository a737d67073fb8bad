#!/usr/bin/env node
// Example agent for the sidecar agent protocol v1 (see ../PROTOCOL.md), JSON text frames.
//
//   node agent.js <socket path> <queue> <N> [publish queue]
//
// Connects over the Unix socket, says hello, pulls batches, acks each message (or fails it
// with PROCESSING_ERROR when its body contains "fail"), publishes one message to the queue
// "<queue>.out" (or the optional 4th argument), and exits after N messages with a JSON summary line on stdout.
'use strict';

const WebSocket = require('ws');

const [socketPath, queue, nArg, publishArg] = process.argv.slice(2);
if (!socketPath || !queue || !nArg) {
  console.error("usage: node agent.js <socket path> <queue> <N> [publish queue]");
  process.exit(2);
}
const target = Number.parseInt(nArg, 10);
const publishQueue = publishArg || `${queue}.out`;

const summary = { processed: 0, acked: 0, failed: 0, published: 0, errors: [], bodies: [] };
let nextRef = 1;
const pendingPublishes = new Map(); // ref -> frame, re-sent when throttled
let welcome = null;
let pulling = false;
let done = false;

const ws = new WebSocket(`ws+unix://${socketPath}:/`);

function send(frame) {
  ws.send(JSON.stringify(frame));
}

function pull() {
  if (done || pulling) return;
  pulling = true;
  const max = welcome ? Math.min(10, welcome.batch_size || 1) : 1;
  send({ kind: 'pull', max, wait: 1.0 });
}

function publish(body, publishQueue) {
  const frame = {
    kind: 'publish',
    ref: nextRef++,
    queue: publishQueue,
    body: Buffer.from(body).toString('base64'), // bytes travel as base64 in JSON
    content_type: 'text/plain',
  };
  pendingPublishes.set(frame.ref, frame);
  send(frame);
}

function finish(code) {
  if (done) return;
  done = true;
  process.stdout.write(JSON.stringify(summary) + '\n');
  // A clean close (1000) tells the sidecar to requeue anything still held, uncharged.
  ws.close(1000, 'done');
  setTimeout(() => process.exit(code), 200).unref();
}

function maybeFinish() {
  if (summary.processed >= target && pendingPublishes.size === 0) finish(0);
}

ws.on('open', () => {
  send({ kind: 'hello', agent: 'node-example', version: '1.0.0', pid: process.pid, queues: [queue], protocol: 1 });
});

ws.on('message', (data, isBinary) => {
  if (isBinary) return; // we said hello in JSON, so the sidecar answers in JSON
  const frame = JSON.parse(data.toString('utf8'));
  switch (frame.kind) {
    case 'welcome':
      welcome = frame;
      publish(`hello from node agent ${process.pid}`, publishQueue);
      pull();
      break;
    case 'batch': {
      pulling = false;
      const ack = [];
      for (const message of frame.messages) {
        const body = Buffer.from(message.body, 'base64').toString('utf8');
        summary.processed += 1;
        summary.bodies.push(body);
        if (body.includes('fail')) {
          summary.failed += 1;
          send({ kind: 'fail', id: message.id, reason: 'PROCESSING_ERROR', error: 'body asked to fail' });
        } else {
          ack.push(message.id);
        }
      }
      if (ack.length) {
        summary.acked += ack.length;
        send({ kind: 'ack', ids: ack });
      }
      if (summary.processed >= target) maybeFinish();
      else pull();
      break;
    }
    case 'published': {
      const pending = pendingPublishes.get(frame.ref);
      if (frame.throttled) {
        // Never lost: send the same frame again after retry_after seconds.
        setTimeout(() => pending && send(pending), Math.ceil((frame.retry_after || 0.1) * 1000));
        break;
      }
      pendingPublishes.delete(frame.ref);
      if (frame.ok) summary.published += 1;
      else summary.errors.push({ code: 'publish_failed', message: frame.error || '' });
      maybeFinish();
      break;
    }
    case 'heartbeat':
      break;
    case 'pressure':
      if (welcome) welcome.batch_size = frame.batch_size;
      break;
    case 'error':
      summary.errors.push({ code: frame.code, message: frame.message });
      if (frame.fatal) finish(1);
      break;
    default:
      break; // unknown kinds from a newer sidecar are ignored
  }
});

ws.on('error', (err) => {
  console.error(`agent: ${err.message}`);
  summary.errors.push({ code: 'socket', message: err.message });
  finish(1);
});

ws.on('close', () => {
  if (!done) finish(1);
});
