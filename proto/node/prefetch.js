// The per-message loop's bookkeeping, free of I/O and of timers: which deliveries are
// buffered ahead of the agent, how many to pull next, which acks wait to go out together,
// and which buffered deliveries need their deadline moved. The same rules as the Python
// clients' sidecar/agent/prefetch.py; the client passes the clock in (`now`, seconds).
//
// * at most one batch is buffered ahead of the agent, and never more than the agent could
//   handle in BUFFER_SHARE of a deadline at the pace it has shown so far;
// * a pull never asks for more than the welcome's limits leave (max_in_flight minus what
//   the agent holds, max_batch, the batch size the sidecar's pressure allows);
// * acks wait to be sent together for at most ACK_DELAY (the client also sends them as soon
//   as the agent waits for anything, whichever comes first);
// * a buffered delivery that has used half of its deadline is extended by a full deadline
//   while the agent is still working on the message it was handed last.
'use strict';

const ACK_DELAY = 0.02; // seconds an ack may wait for others to share its frame
const BUFFER_SHARE = 0.25; // of a deadline: the most buffered work (at the agent's pace) to hold
const PACE_WEIGHT = 0.2; // weight of the newest handling time in the moving average

// A delivery's deadline as this side sees it: from arrival, moved by extends.
function dueAt(item) {
  return item.expiresAt - item.delivery.deadline / 2;
}

class Prefetch {
  constructor() {
    this.buffer = []; // { delivery, expiresAt }, oldest first, from `head` on
    this.head = 0; // index of the oldest buffered item (shifting an array per message is O(n))
    this.pulling = false; // a pull frame is out and its batch not taken yet
    this.pendingAcks = [];
    this.firstAckAt = 0;
    this.lastHanded = null; // the id handed to the agent last
    this.handedAt = null;
    this.pace = 0; // seconds the agent spends per message (moving average; 0 unknown)
  }

  get buffered() {
    return this.buffer.length - this.head;
  }

  // --- pulling ---------------------------------------------------------------------------

  // How many deliveries to pull now; 0 means none (a pull is out, enough is buffered, or the
  // limits leave no room while something is still buffered).
  want({ batch, held, limits, batchSize }) {
    if (this.pulling) return 0;
    let target = Math.max(1, batch);
    if (limits) target = Math.min(target, Math.max(1, limits.max_batch));
    target = Math.min(target, Math.max(1, batchSize));
    const buffered = this.buffered;
    if (buffered > target) return 0; // the batch being worked on, and the next one on its way
    let want = target;
    if (limits) {
      want = Math.min(want, limits.max_in_flight - held);
      if (this.pace > 0) {
        const affordable = Math.floor((limits.deadline * BUFFER_SHARE) / this.pace);
        want = Math.min(want, affordable - buffered);
      }
    }
    // Nothing to hand out: ask anyway, the sidecar answers within its own limits (an empty
    // batch after the wait when the agent holds all it may).
    if (buffered === 0) return Math.max(1, want);
    return Math.max(0, want);
  }

  pulled() {
    this.pulling = true;
  }

  arrived(messages, now) {
    this.pulling = false;
    this.compact();
    for (const delivery of messages) this.buffer.push({ delivery, expiresAt: now + delivery.deadline });
  }

  // The pull was answered with an error instead of a batch.
  pullAnswered() {
    this.pulling = false;
  }

  compact() {
    if (this.head > 0) {
      this.buffer = this.buffer.slice(this.head);
      this.head = 0;
    }
  }

  // --- handing out -----------------------------------------------------------------------

  // The agent asks for the next message: the time since the last one was handed out is what
  // handling it took.
  resumed(now) {
    if (this.handedAt !== null) {
      const spent = Math.max(0, now - this.handedAt);
      this.pace = this.pace === 0 ? spent : this.pace + PACE_WEIGHT * (spent - this.pace);
      this.handedAt = null;
    }
  }

  // The next buffered delivery still held (one the sidecar took back meanwhile is dropped: it
  // was charged and will come again), or null when the buffer is empty.
  take(held, now) {
    while (this.head < this.buffer.length) {
      const { delivery } = this.buffer[this.head++];
      if (held.has(delivery.id)) {
        this.lastHanded = delivery.id;
        this.handedAt = now;
        return delivery;
      }
    }
    return null;
  }

  // Up to `most` buffered deliveries at once, for a plain pull.
  takeMany(most, held) {
    const out = [];
    while (this.head < this.buffer.length && out.length < most) {
      const { delivery } = this.buffer[this.head++];
      if (held.has(delivery.id)) out.push(delivery);
    }
    return out;
  }

  // --- acks ------------------------------------------------------------------------------

  ackLater(id, now) {
    if (this.pendingAcks.length === 0) this.firstAckAt = now;
    this.pendingAcks.push(id);
  }

  acksOverdue(now) {
    return this.pendingAcks.length > 0 && now - this.firstAckAt >= ACK_DELAY;
  }

  takeAcks() {
    const ids = this.pendingAcks;
    this.pendingAcks = [];
    return ids;
  }

  // --- deadlines of buffered deliveries --------------------------------------------------

  // Cheap check before handing out: has the oldest buffered delivery used half its deadline?
  headDue(now) {
    return this.head < this.buffer.length && dueAt(this.buffer[this.head]) <= now;
  }

  // Buffered deliveries that have used half of their deadline, grouped by the seconds to
  // extend them by (their own deadline); marked as extended. A Map of seconds -> ids.
  extensions(now) {
    const due = new Map();
    for (let i = this.head; i < this.buffer.length; i++) {
      const item = this.buffer[i];
      if (dueAt(item) <= now) {
        const seconds = item.delivery.deadline;
        if (!due.has(seconds)) due.set(seconds, []);
        due.get(seconds).push(item.delivery.id);
        item.expiresAt = now + seconds;
      }
    }
    return due;
  }

  // When the earliest buffered delivery needs extending, if the agent is engaged (still
  // working on the message it was handed last); null otherwise.
  nextDue(engaged) {
    if (!engaged || this.head >= this.buffer.length) return null;
    let earliest = Infinity;
    for (let i = this.head; i < this.buffer.length; i++) earliest = Math.min(earliest, dueAt(this.buffer[i]));
    return earliest;
  }
}

module.exports = { Prefetch, ACK_DELAY, BUFFER_SHARE, PACE_WEIGHT };
