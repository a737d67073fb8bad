#!/usr/bin/env node
// Scenarios of the Node client's per-message loop (proto/node/agent.js), driven by
// tests/proto/test_node_messages.py against a real sidecar:
//
//   node node_loop.js <scenario> <socket path> <queue> <options as JSON>
//
// Each prints one JSON line: what the agent saw and every frame it sent.
'use strict';

const path = require('node:path');

const { Agent } = require(path.join(__dirname, '..', '..', 'proto', 'node', 'agent.js'));

// Keep every frame the agent sends (kind, and the ids of acks and extends).
function recordFrames(agent) {
  const sent = [];
  const send = agent.send.bind(agent);
  agent.send = (frame) => {
    sent.push({ kind: frame.kind, ids: frame.ids, max: frame.max, held: agent.held.size, headers: frame.headers });
    send(frame);
  };
  return sent;
}

function seen(message) {
  return { body: message.body.toString('utf8'), attempt: message.attempt };
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

const scenarios = {
  // Ack every message of a burst, `count` in all.
  async burst(agent, { count, batch = 50, wait = 0.5 }) {
    const out = [];
    for await (const message of agent.messages({ batch, wait })) {
      out.push(seen(message));
      message.ack();
      if (out.length === count) break;
    }
    return { seen: out };
  },

  // Take `take` messages and leave the loop; with `rest`, hand out the others on the same
  // connection (a plain pull first, then another loop), else close with what was pulled
  // ahead still buffered.
  async leave(agent, { take, rest = 0, batch = 10, wait = 0.5 }) {
    const first = [];
    for await (const message of agent.messages({ batch, wait })) {
      first.push(seen(message));
      message.ack();
      if (first.length === take) break;
    }
    const bufferedAfterBreak = agent.prefetch.buffered;
    const pullingAfterBreak = agent.prefetch.pulling;
    const later = [];
    if (rest > 0) {
      const pulled = await agent.pull(2, wait);
      later.push(...pulled.map((d) => ({ body: Buffer.from(d.body, 'base64').toString('utf8'), attempt: d.attempt })));
      agent.ack(pulled.map((d) => d.id));
      for await (const message of agent.messages({ batch, wait })) {
        later.push(seen(message));
        message.ack();
        if (later.length === rest) break;
      }
    }
    return { seen: first, later, bufferedAfterBreak, pullingAfterBreak };
  },

  // Work `sleepMs` on each message before acking it, `count` in all.
  async slow(agent, { count, sleepMs, batch = 8, wait = 0.5 }) {
    const out = [];
    for await (const message of agent.messages({ batch, wait })) {
      out.push(seen(message));
      await sleep(sleepMs);
      message.ack();
      if (out.length === count) break;
    }
    return { seen: out };
  },

  // For each message, publish one to `out`: the first `loop` messages through the loop's
  // message.publish, the rest from a run() handler with a plain agent.publish after an
  // await. A body starting with "own" publishes with a traceparent of the agent's own.
  async trace(agent, { count, loop, out, own }) {
    const publishFrom = (body, publish) => {
      const fields = body.startsWith('own') ? { headers: { traceparent: own } } : {};
      return publish(`derived ${body}`, out, fields);
    };
    const results = [];
    let handled = 0;
    for await (const message of agent.messages({ batch: 10, wait: 0.5 })) {
      const body = message.body.toString('utf8');
      results.push(await publishFrom(body, (...args) => message.publish(...args)));
      message.ack();
      if (++handled === loop) break;
    }
    await agent.run(
      async (delivery) => {
        const body = Buffer.from(delivery.body, 'base64').toString('utf8');
        await sleep(1); // the handler's context survives its awaits
        results.push(await publishFrom(body, (...args) => agent.publish(...args)));
        handled += 1;
      },
      { wait: 0.5, stop: () => handled >= count },
    );
    // Outside any handler: no trace to carry.
    results.push(await agent.publish('outside', out));
    return { handled, published: results.filter((r) => r.ok).length };
  },
};

async function main() {
  const [scenario, socketPath, queue, optionsJson] = process.argv.slice(2);
  const agent = new Agent(socketPath);
  const sent = recordFrames(agent);
  let result;
  try {
    await agent.hello(`node-${scenario}`, '1.0.0', [queue]);
    result = await scenarios[scenario](agent, JSON.parse(optionsJson || '{}'));
  } catch (err) {
    result = { failed: `${err.name}: ${err.message}` };
  }
  agent.close();
  const frames = sent.map(({ kind, ids, max, held, headers }) => ({ kind, ids, max, held, headers }));
  process.stdout.write(JSON.stringify({ ...result, frames, errors: agent.errors }) + '\n');
  if (agent.ws.readyState !== agent.ws.CLOSED) await new Promise((resolve) => agent.ws.once('close', resolve));
}

main();
