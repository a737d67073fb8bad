#!/usr/bin/env node
// The Node client as a bench agent role (see bench/node.py); one JSON line per event, as
// bench/agent.py reports.
//
//   node bench/node_agent.js <mode> <socket> <queue> <count> <batch>
//
// modes: consume (pull `batch`, ack them in one frame), each (one at a time through
// messages(), `batch` pulled ahead), run (agent.run with a handler that returns at once).
// BENCH_NODE_AGENT names another agent.js to load (an older one, for an A/B run).
'use strict';

const path = require('node:path');

const agentJs = process.env.BENCH_NODE_AGENT || path.join(__dirname, '..', 'proto', 'node', 'agent.js');
const { Agent } = require(agentJs);

const emit = (fields) => process.stdout.write(JSON.stringify(fields) + '\n');
const cpuSeconds = () => {
  const { user, system } = process.cpuUsage();
  return (user + system) / 1e6;
};

async function main() {
  const [mode, socket, queue, countArg, batchArg] = process.argv.slice(2);
  const count = Number(countArg);
  const batch = Number(batchArg);
  const agent = new Agent(socket);
  await agent.hello(`bench-node-${mode}`, '1.0.0', [queue]);
  emit({ event: 'ready' });
  let n = 0;
  let first = 0;
  let cpu0 = 0;
  let lastProgress = Date.now();
  const started = () => {
    if (n === 0) {
      first = Date.now() / 1000;
      cpu0 = cpuSeconds();
    }
  };
  const done = () => n >= count || Date.now() - lastProgress > 10_000;
  if (mode === 'consume') {
    while (!done()) {
      const messages = await agent.pull(batch, 1.0);
      if (!messages.length) continue;
      started();
      agent.ack(messages.map((m) => m.id));
      n += messages.length;
      lastProgress = Date.now();
    }
  } else if (mode === 'each') {
    for await (const message of agent.messages({ batch, wait: 1.0, stop: done })) {
      started();
      message.ack();
      n += 1;
      lastProgress = Date.now();
    }
  } else if (mode === 'run') {
    await agent.run(
      () => {
        started();
        n += 1;
        lastProgress = Date.now();
      },
      { batch, wait: 1.0, stop: done },
    );
  } else {
    throw new Error(`unknown mode ${mode}`);
  }
  const cpu = cpuSeconds() - cpu0;
  const last = Date.now() / 1000;
  agent.close();
  emit({
    event: 'result', n, cpu_s: cpu, complete: n >= count, first, last,
    rate: n > 1 && last > first ? (n - 1) / (last - first) : 0,
    errors: agent.errors.map((e) => e.code).slice(0, 5),
  });
  setTimeout(() => process.exit(0), 200).unref();
}

main().catch((err) => {
  process.stderr.write(`${err.stack}\n`);
  process.exit(1);
});
