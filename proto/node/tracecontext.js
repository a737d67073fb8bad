// W3C Trace Context (level 1) read from a delivery's headers, with the same strict rules as
// the sidecar's sidecar/tracecontext.py: only an exact version-00 `traceparent` counts, and a
// `tracestate` is kept only when it is short printable list text. Header values come from
// anyone: anything else is ignored, never an error.
'use strict';

const TRACEPARENT = 'traceparent';
const TRACESTATE = 'tracestate';
const TRACEPARENT_LENGTH = 55; // "00-" + 32 hex trace id + "-" + 16 hex parent id + "-" + 2 hex flags
const MAX_TRACESTATE = 512; // a longer one is dropped whole, as the sidecar does

const TRACEPARENT_RE = /^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$/;
const ZERO_TRACE = '0'.repeat(32);
const ZERO_PARENT = '0'.repeat(16);
// Printable ASCII without the characters the list syntax cannot hold inside a member.
const MEMBER_RE = /^[\x20-\x2b\x2d-\x3c\x3e-\x7e]*(?:=[\x20-\x2b\x2d-\x3c\x3e-\x7e]*)?$/;

// The traceparent value when it is a valid version-00 one, else null.
function parseTraceparent(value) {
  if (typeof value !== 'string' || value.length !== TRACEPARENT_LENGTH) return null;
  const match = TRACEPARENT_RE.exec(value);
  if (!match || match[1] === ZERO_TRACE || match[2] === ZERO_PARENT) return null;
  return value;
}

// The tracestate value kept verbatim when it is short printable list text, else null.
function parseTracestate(value) {
  if (typeof value !== 'string' || value.length > MAX_TRACESTATE || !value.trim()) return null;
  return value.split(',').every((member) => MEMBER_RE.test(member)) ? value : null;
}

// { traceparent, tracestate } a delivery carries, or null without a valid traceparent.
function traceContext(headers) {
  if (!headers || typeof headers !== 'object') return null;
  const traceparent = parseTraceparent(headers[TRACEPARENT]);
  if (traceparent === null) return null;
  return { traceparent, tracestate: parseTracestate(headers[TRACESTATE]) };
}

// Publish `fields` carrying `delivery`'s trace context (traceparent and tracestate headers),
// unless the agent set a traceparent itself or the delivery carried no valid one.
function withTrace(fields, delivery) {
  if (!delivery) return fields;
  const headers = fields.headers || {};
  if (TRACEPARENT in headers) return fields;
  const context = traceContext(delivery.headers);
  if (context === null) return fields;
  const carried = { ...headers, [TRACEPARENT]: context.traceparent };
  if (context.tracestate !== null) carried[TRACESTATE] = context.tracestate;
  return { ...fields, headers: carried };
}

module.exports = { TRACEPARENT, TRACESTATE, parseTraceparent, parseTracestate, traceContext, withTrace };
