#!/usr/bin/env node
// Example agent for the sidecar agent protocol v1 (see ../PROTOCOL.md), JSON text frames.
//
//   node agent.js <socket path> <queue> <N> [publish queue]
//
// Connects over the Unix socket, says hello, publishes one message to "<queue>.out" (or the
// optional 4th argument), then runs a handler over pulled messages: a message is acked when
// the handler returns and failed with the reason its exception maps to when it throws (a
// Failure names its reason; here a body containing "fail" throws one). It exits after N
// messages with a JSON summary line on stdout. Ctrl-C closes the connection with 1000, so
// whatever the agent still holds is requeued uncharged, and exits quietly.
'use strict';

const WebSocket = require('ws');

const MIN_RESEND_MS = 50; // a throttled publish is never resent sooner than this

// --- errors --------------------------------------------------------------------------------

// An error frame from the sidecar, raised at the call that caused it. `code` is the frame's
// code; `ids` the delivery ids an unknown_delivery names.
class SidecarError extends Error {
  constructor(frame) {
    super(`${frame.code}: ${frame.message}`);
    this.name = 'SidecarError';
    this.code = frame.code;
    this.ref = frame.ref ?? null;
    this.ids = frame.ids || (frame.ref != null ? [frame.ref] : []);
    this.fatal = Boolean(frame.fatal);
  }
}

// Throw from a handler to fail the message with `reason` (optionally with a retry hint).
class Failure extends Error {
  constructor(reason, message = '', retryAfter = null) {
    super(message || reason);
    this.name = 'Failure';
    this.reason = reason;
    this.retryAfter = retryAfter;
  }
}

const NETWORK_CODES = new Set([
  'ECONNRESET', 'ECONNREFUSED', 'ETIMEDOUT', 'EHOSTUNREACH', 'ENETUNREACH', 'ENOTFOUND', 'EPIPE', 'EAI_AGAIN',
]);

// The default mapping from an exception to a failure reason.
function reasonFor(err) {
  if (err instanceof Failure) return { reason: err.reason, error: err.message, retryAfter: err.retryAfter };
  const error = `${err && err.name}: ${err && err.message}`.slice(0, 1024);
  if (err && (err.name === 'TimeoutError' || err.code === 'ETIMEDOUT')) return { reason: 'TIMEOUT', error };
  if (err && NETWORK_CODES.has(err.code)) return { reason: 'NETWORK_ERROR', error };
  if (err instanceof SyntaxError || err instanceof TypeError || err instanceof RangeError) {
    return { reason: 'VALIDATION_FAILED', error };
  }
  return { reason: 'PROCESSING_ERROR', error };
}

// --- the client ----------------------------------------------------------------------------

class Agent {
  constructor(socketPath) {
    this.ws = new WebSocket(`ws+unix://${socketPath}:/`);
    this.welcome = null;
    this.errors = []; // errors no call was waiting for (late answers, expired deadlines)
    this.held = new Set();
    this.nextRef = 1;
    this.pendingPull = null; // { resolve, reject }
    this.pendingPublishes = new Map(); // ref -> { resolve, reject }
    this.closed = false;
    this.onWelcome = null;
    this.ws.on('message', (data, isBinary) => {
      if (!isBinary) this.route(JSON.parse(data.toString('utf8')));
    });
    this.ws.on('close', () => this.fail_all(new Error('connection to the sidecar closed')));
    this.ws.on('error', (err) => this.fail_all(err));
  }

  send(frame) {
    this.ws.send(JSON.stringify(frame));
  }

  hello(agent, version, queues) {
    return new Promise((resolve, reject) => {
      this.onWelcome = { resolve, reject };
      const go = () => this.send({ kind: 'hello', agent, version, pid: process.pid, queues, protocol: 1 });
      if (this.ws.readyState === WebSocket.OPEN) go();
      else this.ws.once('open', go);
    });
  }

  route(frame) {
    switch (frame.kind) {
      case 'welcome':
        this.welcome = frame;
        if (this.onWelcome) this.onWelcome.resolve(frame);
        break;
      case 'batch': {
        for (const m of frame.messages) this.held.add(m.id);
        const waiter = this.pendingPull;
        this.pendingPull = null;
        if (waiter) waiter.resolve(frame.messages);
        break;
      }
      case 'published': {
        const waiter = this.pendingPublishes.get(frame.ref);
        this.pendingPublishes.delete(frame.ref);
        if (waiter) waiter.resolve(frame);
        break;
      }
      case 'pressure':
        if (this.welcome) this.welcome.batch_size = frame.batch_size;
        break;
      case 'error':
        this.routeError(frame);
        break;
      default:
        break; // heartbeats, and unknown kinds from a newer sidecar
    }
  }

  routeError(frame) {
    const err = new SidecarError(frame);
    if (frame.fatal && this.onWelcome && !this.welcome) {
      this.onWelcome.reject(err);
      return;
    }
    if (frame.code === 'invalid_publish' && this.pendingPublishes.has(frame.ref)) {
      const waiter = this.pendingPublishes.get(frame.ref);
      this.pendingPublishes.delete(frame.ref);
      waiter.reject(err);
      return;
    }
    if ((frame.code === 'invalid_pull' || frame.code === 'pull_in_progress') && this.pendingPull) {
      const waiter = this.pendingPull;
      this.pendingPull = null;
      waiter.reject(err);
      return;
    }
    if (frame.code === 'deadline_expired' && frame.ref != null) this.held.delete(frame.ref);
    for (const id of frame.ids || []) this.held.delete(id);
    this.errors.push({ code: frame.code, message: frame.message, ids: frame.ids || null });
  }

  fail_all(err) {
    this.closed = true;
    if (this.pendingPull) this.pendingPull.reject(err);
    this.pendingPull = null;
    for (const waiter of this.pendingPublishes.values()) waiter.reject(err);
    this.pendingPublishes.clear();
    if (this.onWelcome && !this.welcome) this.onWelcome.reject(err);
  }

  pull(max = 10, wait = 1.0) {
    return new Promise((resolve, reject) => {
      if (this.closed) return reject(new Error('connection to the sidecar closed'));
      this.pendingPull = { resolve, reject };
      this.send({ kind: 'pull', max, wait });
    });
  }

  checkHeld(ids) {
    const unknown = ids.filter((id) => !this.held.has(id));
    if (unknown.length) {
      throw new SidecarError({ code: 'unknown_delivery', message: `${unknown.length} id(s) not held`, ids: unknown });
    }
  }

  ack(ids) {
    this.checkHeld(ids);
    for (const id of ids) this.held.delete(id);
    this.send({ kind: 'ack', ids });
  }

  fail(id, reason, error = '', retryAfter = null) {
    const accepted = (this.welcome && this.welcome.reasons) || [];
    if (accepted.length && !accepted.includes(reason.toUpperCase())) {
      throw new SidecarError({
        code: 'unknown_reason', message: `unknown failure reason ${reason}; accepted: ${accepted.join(', ')}`, ref: id,
      });
    }
    this.checkHeld([id]);
    this.held.delete(id);
    const frame = { kind: 'fail', id, reason, error };
    if (retryAfter != null) frame.retry_after = retryAfter;
    this.send(frame);
  }

  extend(ids, seconds) {
    this.checkHeld(ids);
    this.send({ kind: 'extend', ids, seconds });
  }

  // One publish frame and its answer, throttled or not.
  publishOnce(body, queue, fields = {}) {
    return new Promise((resolve, reject) => {
      if (this.closed) return reject(new Error('connection to the sidecar closed'));
      const ref = this.nextRef++;
      this.pendingPublishes.set(ref, { resolve, reject });
      // Bytes travel as base64 in JSON.
      this.send({ kind: 'publish', ref, queue, body: Buffer.from(body).toString('base64'), ...fields });
    });
  }

  // Publish and wait for the final answer; a throttled one is resent after retry_after.
  async publish(body, queue, fields = {}) {
    for (;;) {
      const answer = await this.publishOnce(body, queue, fields);
      if (!answer.throttled) return answer;
      const delay = Math.max(Math.ceil((answer.retry_after || 0) * 1000), MIN_RESEND_MS);
      await new Promise((r) => setTimeout(r, delay));
    }
  }

  // Pull and handle until stop() says so: ack on return, fail with the mapped reason on throw.
  async run(handler, { batch = 10, wait = 1.0, stop = () => false } = {}) {
    while (!stop() && !this.closed) {
      const max = Math.max(1, Math.min(batch, (this.welcome && this.welcome.batch_size) || 1));
      for (const message of await this.pull(max, wait)) {
        try {
          await handler(message);
        } catch (err) {
          const { reason, error, retryAfter } = reasonFor(err);
          this.fail(message.id, reason, error, retryAfter);
          continue;
        }
        this.ack([message.id]);
      }
    }
  }

  close() {
    // A clean close (1000) tells the sidecar to requeue anything still held, uncharged.
    if (this.ws.readyState === WebSocket.OPEN || this.ws.readyState === WebSocket.CONNECTING) {
      this.ws.close(1000, 'done');
    }
  }
}

// --- the example program -------------------------------------------------------------------

async function main() {
  const [socketPath, queue, nArg, publishArg] = process.argv.slice(2);
  if (!socketPath || !queue || !nArg) {
    console.error('usage: node agent.js <socket path> <queue> <N> [publish queue]');
    process.exit(2);
  }
  const target = Number.parseInt(nArg, 10);
  const summary = { processed: 0, acked: 0, failed: 0, published: 0, errors: [], bodies: [] };
  const agent = new Agent(socketPath);
  let interrupted = false;
  process.once('SIGINT', () => {
    interrupted = true;
    agent.close(); // the pending pull then fails, and main ends below
    setTimeout(() => process.exit(130), 2000).unref();
  });
  try {
    await agent.hello('node-example', '1.0.0', [queue]);
    const published = await agent.publish(`hello from node agent ${process.pid}`, publishArg || `${queue}.out`, {
      content_type: 'text/plain',
    });
    if (published.ok) summary.published += 1;
    else summary.errors.push({ code: 'publish_failed', message: published.error || '' });
    await agent.run(
      async (message) => {
        const body = Buffer.from(message.body, 'base64').toString('utf8');
        summary.processed += 1;
        summary.bodies.push(body);
        if (body.includes('fail')) {
          summary.failed += 1;
          throw new Failure('PROCESSING_ERROR', 'body asked to fail');
        }
        summary.acked += 1;
      },
      { stop: () => summary.processed >= target },
    );
  } catch (err) {
    if (!interrupted) summary.errors.push({ code: err.code || 'socket', message: err.message });
  }
  if (interrupted) {
    console.error('interrupted; connection closed');
    process.exit(130);
  }
  summary.errors.push(...agent.errors.filter((e) => e.code !== 'deadline_expired'));
  process.stdout.write(JSON.stringify(summary) + '\n');
  agent.close();
  setTimeout(() => process.exit(summary.errors.length ? 1 : 0), 200).unref();
}

if (require.main === module) main();

module.exports = { Agent, Failure, SidecarError, reasonFor };
