#!/usr/bin/env node
// A Node.js client for the sidecar agent protocol v1 (see ../PROTOCOL.md), JSON text frames,
// and an example program using it.
//
//   const { Agent } = require('./agent');
//   const agent = new Agent('/run/sidecar/agent.sock');
//   await agent.hello('parser', '1.0.0', ['html.raw']);
//   for await (const message of agent.messages()) {   // one delivery at a time
//     ...                                            // message.body (a Buffer), .attempt, .headers
//     message.ack();                                 // or fail(reason, error) / extend(seconds)
//     await message.publish('result', 'html.parsed'); // continues the message's trace
//   }
//   agent.close();                                   // 1000: what is still held is requeued uncharged
//
// Behind messages() one batch is pulled ahead within the welcome's limits, the acks of a
// burst share one frame, and buffered deliveries have their deadlines extended while the
// agent works (the Python clients' rules, ./prefetch.js). agent.run(handler) does the same
// with a handler: ack on return, fail with the mapped reason on throw; what the handler
// publishes continues its message's trace (traceparent, tracestate).
//
//   node agent.js <socket path> <queue> <N> [publish queue]
//
// The example connects over the Unix socket, says hello, publishes one message to
// "<queue>.out" (or the optional 4th argument), then runs a handler over the messages: a
// body containing "fail" throws a Failure. It exits after N messages with a JSON summary line
// on stdout. Ctrl-C closes the connection with 1000, so whatever the agent still holds is
// requeued uncharged, and exits quietly.
'use strict';

const { AsyncLocalStorage } = require('node:async_hooks');
const WebSocket = require('ws');

const { Prefetch } = require('./prefetch');
const { withTrace } = require('./tracecontext');

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

// --- trace context -------------------------------------------------------------------------

// The delivery whose handler is running (set by `run`), so what the handler publishes
// continues that delivery's trace without passing it along.
const handling = new AsyncLocalStorage();

// --- the client ----------------------------------------------------------------------------

function nowSeconds() {
  return performance.now() / 1000;
}

function closedError() {
  return new Error('connection to the sidecar closed');
}

// One delivery handed out by `messages()`, with the calls that answer it. `ack`, `fail` and
// `extend` take effect at once (no need to await them); an id the agent no longer holds
// throws a SidecarError (unknown_delivery) before anything is sent.
class Message {
  constructor(agent, delivery) {
    this.agent = agent;
    this.delivery = delivery; // the delivery as the sidecar sent it (body in base64)
    this.decoded = null;
  }

  get id() { return this.delivery.id; }
  get queue() { return this.delivery.queue; }
  get attempt() { return this.delivery.attempt; }
  get deadline() { return this.delivery.deadline; }
  get headers() { return this.delivery.headers; }
  get routingKey() { return this.delivery.routing_key || ''; }
  get exchange() { return this.delivery.exchange || ''; }
  get messageId() { return this.delivery.message_id ?? null; }
  get contentType() { return this.delivery.content_type ?? null; }
  get priority() { return this.delivery.priority ?? null; }
  get redelivered() { return Boolean(this.delivery.redelivered); }
  get reducedScope() { return Boolean(this.delivery.reduced_scope); }

  // The body as a Buffer (decoded once).
  get body() {
    if (this.decoded === null) this.decoded = Buffer.from(this.delivery.body, 'base64');
    return this.decoded;
  }

  // Done. The ack goes out with the others of the same burst: when the event loop next turns
  // (the agent awaits I/O, a timer or the next batch), or with the next message asked for
  // ACK_DELAY or more after the first ack.
  ack() {
    this.agent.ackSoon(this.delivery.id);
  }

  fail(reason, error = '', retryAfter = null) {
    this.agent.fail(this.delivery.id, reason, error, retryAfter);
  }

  extend(seconds) {
    this.agent.extend([this.delivery.id], seconds);
  }

  // `publish` continuing this message's trace (its traceparent and tracestate).
  publish(body, queue, fields = {}) {
    return this.agent.publish(body, queue, { ...fields, trace: this.delivery });
  }
}

class Agent {
  constructor(socketPath) {
    this.ws = new WebSocket(`ws+unix://${socketPath}:/`);
    this.welcome = null;
    this.errors = []; // errors no call was waiting for (late answers, expired deadlines)
    this.held = new Set(); // handed out or buffered, not answered yet
    this.nextRef = 1;
    this.prefetch = new Prefetch();
    this.batchWaiters = []; // { resolve, reject }: waiting for the batch of the pull that is out
    this.pendingPublishes = new Map(); // ref -> { resolve, reject }
    this.flushQueued = null; // the setImmediate that sends waiting acks
    this.keeperTimer = null; // extends buffered deliveries while the agent works
    this.keeperDue = Infinity;
    this.closed = false;
    this.onWelcome = null;
    this.ws.on('message', (data, isBinary) => {
      if (!isBinary) this.route(JSON.parse(data.toString('utf8')));
    });
    this.ws.on('close', () => this.fail_all(closedError()));
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
        for (const m of frame.messages) {
          // Fields at their default value are left out of the frame.
          m.attempt ??= 1;
          m.deadline ??= 30.0;
          m.headers ??= {};
          this.held.add(m.id);
        }
        this.prefetch.arrived(frame.messages, nowSeconds());
        this.wakeBatchWaiters(null);
        this.arm(true);
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
    if (frame.code === 'invalid_pull' && this.prefetch.pulling) {
      this.prefetch.pullAnswered();
      this.wakeBatchWaiters(err);
      return;
    }
    // The pull that is out keeps going: its batch is the one to wait for.
    if (frame.code === 'pull_in_progress' && this.prefetch.pulling) return;
    if (frame.code === 'deadline_expired' && frame.ref != null) this.held.delete(frame.ref);
    for (const id of frame.ids || []) this.held.delete(id);
    this.errors.push({ code: frame.code, message: frame.message, ids: frame.ids || null });
    this.errors.splice(0, this.errors.length - 100); // the recent ones, not a long session's all
  }

  fail_all(err) {
    this.closed = true;
    this.held.clear(); // the sidecar has taken back whatever the connection held
    this.wakeBatchWaiters(err);
    for (const waiter of this.pendingPublishes.values()) waiter.reject(err);
    this.pendingPublishes.clear();
    if (this.onWelcome && !this.welcome) this.onWelcome.reject(err);
    clearTimeout(this.keeperTimer);
    this.keeperTimer = null;
  }

  batchSize() {
    return (this.welcome && this.welcome.batch_size) || 1;
  }

  // --- pulling -----------------------------------------------------------------------------

  sendPull(max, wait) {
    this.flushAcks(); // the sidecar counts unanswered deliveries against max_in_flight
    this.send({ kind: 'pull', max, wait });
    this.prefetch.pulled();
  }

  // Resolves when the batch of the pull that is out has been buffered.
  receiveBatch() {
    if (this.closed) return Promise.reject(closedError());
    return new Promise((resolve, reject) => this.batchWaiters.push({ resolve, reject }));
  }

  wakeBatchWaiters(err) {
    const waiters = this.batchWaiters;
    this.batchWaiters = [];
    for (const waiter of waiters) {
      if (err) waiter.reject(err);
      else waiter.resolve();
    }
  }

  // Up to `max` deliveries, waiting at most `wait` seconds for the first. What `messages()`
  // pulled ahead and did not hand out comes first, without a new pull.
  async pull(max = 10, wait = 1.0) {
    if (this.closed) throw closedError();
    if (this.prefetch.pulling) await this.receiveBatch();
    if (this.prefetch.buffered) return this.prefetch.takeMany(max, this.held);
    this.sendPull(max, wait);
    await this.receiveBatch();
    return this.prefetch.takeMany(this.prefetch.buffered, this.held);
  }

  // Deliveries one at a time: `for await (const message of agent.messages()) { ... }`.
  //
  // Answer each with message.ack() / fail(reason, error) / extend(seconds). Behind it, up to
  // `batch` deliveries (within the welcome's limits) are pulled ahead while the agent works,
  // and the acks of a burst go out in one frame. The loop ends when stop() is true (checked
  // before each message and after each idle `wait`).
  //
  // Leaving the loop early (break, an exception) keeps what was pulled ahead held by this
  // connection: the next messages() or pull() hands it out first, and close() (1000)
  // returns it to the queue uncharged. A buffered delivery has its deadline moved while the
  // agent works on the message handed out last; left alone after the loop, it runs to its
  // deadline (charged TIMEOUT).
  async *messages({ batch = 50, wait = 5.0, stop = null } = {}) {
    const prefetch = this.prefetch;
    for (;;) {
      if (stop && stop()) {
        this.flushAcks();
        return;
      }
      if (this.closed) throw closedError();
      const now = nowSeconds();
      if (prefetch.acksOverdue(now)) this.flushAcks();
      const want = prefetch.want({
        batch, held: this.held.size, limits: this.welcome && this.welcome.limits, batchSize: this.batchSize(),
      });
      if (want) this.sendPull(want, wait);
      if (prefetch.headDue(now)) this.extendBuffered(now);
      const delivery = prefetch.take(this.held, now);
      if (delivery !== null) {
        this.arm(false);
        yield new Message(this, delivery);
        prefetch.resumed(nowSeconds());
        continue;
      }
      this.flushAcks(); // never hold an ack while waiting for input
      await this.receiveBatch();
    }
  }

  // --- answers -----------------------------------------------------------------------------

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

  // An ack that waits for the others of its burst (see Message.ack).
  ackSoon(id) {
    this.checkHeld([id]);
    this.held.delete(id);
    this.prefetch.ackLater(id, nowSeconds());
    // Runs as soon as the agent's code waits for I/O or a timer: the event loop turns then.
    this.flushQueued ??= setImmediate(() => {
      this.flushQueued = null;
      this.flushAcks();
    });
  }

  flushAcks() {
    if (this.prefetch.pendingAcks.length === 0 || this.closed) return;
    this.send({ kind: 'ack', ids: this.prefetch.takeAcks() });
  }

  extendBuffered(now) {
    for (const [seconds, ids] of this.prefetch.extensions(now)) this.send({ kind: 'extend', ids, seconds });
  }

  // Keep a timer for the next buffered delivery to extend while the agent works on the
  // message handed out last. `recompute` after a batch arrived; otherwise a timer already set
  // stays (taking messages out of the buffer only makes the next due time later, and a timer
  // that fires early just finds nothing due and sets itself again).
  arm(recompute) {
    if (this.closed || (this.keeperTimer !== null && !recompute)) return;
    const due = this.prefetch.nextDue(this.held.has(this.prefetch.lastHanded));
    if (due === null || (this.keeperTimer !== null && due >= this.keeperDue)) return;
    clearTimeout(this.keeperTimer);
    this.keeperDue = due;
    this.keeperTimer = setTimeout(() => this.keep(), Math.max(0, (due - nowSeconds()) * 1000));
    this.keeperTimer.unref(); // the connection keeps the process alive, not this timer
  }

  keep() {
    this.keeperTimer = null;
    this.keeperDue = Infinity;
    this.flushAcks();
    if (this.held.has(this.prefetch.lastHanded)) {
      this.extendBuffered(nowSeconds());
      this.arm(true);
    }
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

  // --- publishing --------------------------------------------------------------------------

  // One publish frame and its answer, throttled or not. `fields.trace` (a delivery or a
  // Message) names the message whose trace this one continues; without it, the message
  // whose handler is running under `run`, if any.
  publishOnce(body, queue, fields = {}) {
    return new Promise((resolve, reject) => {
      if (this.closed) return reject(closedError());
      const { trace, ...rest } = fields;
      const from = trace instanceof Message ? trace.delivery : trace ?? handling.getStore();
      const ref = this.nextRef++;
      this.pendingPublishes.set(ref, { resolve, reject });
      // Bytes travel as base64 in JSON.
      this.send({ kind: 'publish', ref, queue, body: Buffer.from(body).toString('base64'), ...withTrace(rest, from) });
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

  // Handle messages one at a time (through messages()) until stop() says so: ack when the
  // handler returns, fail with the mapped reason when it throws. The handler gets the
  // delivery as the sidecar sent it (body in base64); what it publishes continues that
  // delivery's trace. A message whose deadline expired meanwhile is skipped, not an error.
  async run(handler, { batch = 10, wait = 1.0, stop = () => false } = {}) {
    for await (const message of this.messages({ batch, wait, stop })) {
      let thrown = null;
      try {
        await handling.run(message.delivery, () => handler(message.delivery));
      } catch (err) {
        thrown = err;
      }
      try {
        if (thrown === null) {
          message.ack();
        } else {
          const { reason, error, retryAfter } = reasonFor(thrown);
          try {
            message.fail(reason, error, retryAfter);
          } catch (err) {
            if (!(err instanceof SidecarError && err.code === 'unknown_reason')) throw err;
            message.fail('PROCESSING_ERROR', error, retryAfter);
          }
        }
      } catch (err) {
        if (!(err instanceof SidecarError && err.code === 'unknown_delivery')) throw err;
      }
    }
  }

  close() {
    // A clean close (1000) tells the sidecar to requeue anything still held, uncharged;
    // acks given go out first.
    if (this.ws.readyState === WebSocket.OPEN) this.flushAcks();
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

module.exports = { Agent, Message, Failure, SidecarError, reasonFor };
