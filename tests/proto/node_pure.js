#!/usr/bin/env node
// Runs the Node client's pure parts on inputs from stdin (JSON) and prints what they return,
// for tests/proto/test_node_parity.py to compare with the Python clients' own.
//
//   {"prefetch": [[op, args], ...], "trace": [[delivery headers, publish fields], ...]}
'use strict';

const path = require('node:path');

const node = path.join(__dirname, '..', '..', 'proto', 'node');
const { Prefetch } = require(path.join(node, 'prefetch.js'));
const { withTrace } = require(path.join(node, 'tracecontext.js'));

function runPrefetch(ops) {
  const prefetch = new Prefetch();
  return ops.map(([op, a]) => {
    switch (op) {
      case 'want':
        return prefetch.want({ batch: a.batch, held: a.held, limits: a.limits, batchSize: a.batch_size });
      case 'pulled':
        return prefetch.pulled() ?? null;
      case 'arrived':
        return prefetch.arrived(a.deliveries, a.now) ?? null;
      case 'pull_answered':
        return prefetch.pullAnswered() ?? null;
      case 'resumed':
        prefetch.resumed(a.now);
        return prefetch.pace;
      case 'take': {
        const delivery = prefetch.take(new Set(a.held), a.now);
        return delivery === null ? null : delivery.id;
      }
      case 'take_many':
        return prefetch.takeMany(a.most, new Set(a.held)).map((d) => d.id);
      case 'ack_later':
        return prefetch.ackLater(a.id, a.now) ?? null;
      case 'acks_overdue':
        return prefetch.acksOverdue(a.now);
      case 'take_acks':
        return prefetch.takeAcks();
      case 'head_due':
        return prefetch.headDue(a.now);
      case 'extensions':
        return [...prefetch.extensions(a.now)];
      case 'next_due':
        return prefetch.nextDue(a.engaged);
      default:
        throw new Error(`unknown op ${op}`);
    }
  });
}

let input = '';
process.stdin.setEncoding('utf8');
process.stdin.on('data', (chunk) => { input += chunk; });
process.stdin.on('end', () => {
  const { prefetch, trace } = JSON.parse(input);
  const out = {
    prefetch: runPrefetch(prefetch),
    trace: trace.map(([headers, fields]) => withTrace(fields, { headers })),
  };
  process.stdout.write(JSON.stringify(out) + '\n');
});
