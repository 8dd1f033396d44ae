#!/usr/bin/env node
// node_https.js: the static-OpenSSL HTTPS test server (node 20, no npm packages).
//
//   node node_https.js --port P --cert C --key K [--host 127.0.0.1] [--h2]
//
// Node links OpenSSL statically into its own binary (no libssl.so), so this
// is the server the tests use for "OpenSSL without a shared library".
// HTTP/1.1 with keep-alive, or with --h2 HTTP/2 only (ALPN h2, node's http2 module).
// Endpoints (same contract as tests/demo/app.py):
//   GET  /api/test/bytes/{n}  exactly n bytes (0 <= n <= 4 MiB),
//                             application/octet-stream, byte i = (7*i + (i >> 8)) & 0xFF
//   POST /api/test/echo       the request body, Content-Type echoed
//   anything else             404 {"error":"not_found","status":404}
// Prints "READY <port>" on stdout once listening; SIGTERM/SIGINT exit 0.
'use strict';

const fs = require('fs');
const https = require('https');
const http2 = require('http2');

function parseArgs(argv) {
  const out = { host: '127.0.0.1' };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const take = () => {
      if (i + 1 >= argv.length) usage(`missing value for ${a}`);
      return argv[++i];
    };
    if (a === '--port') out.port = Number(take());
    else if (a === '--cert') out.cert = take();
    else if (a === '--key') out.key = take();
    else if (a === '--host') out.host = take();
    else if (a === '--h2') out.h2 = true;
    else if (a === '-h' || a === '--help') usage();
    else usage(`unknown argument ${a}`);
  }
  if (!Number.isInteger(out.port) || out.port < 0 || out.port > 65535 || !out.cert || !out.key) {
    usage('--port, --cert and --key are required');
  }
  return out;
}

function usage(msg) {
  if (msg) process.stderr.write(`node_https.js: ${msg}\n`);
  process.stderr.write('usage: node node_https.js --port P --cert C --key K [--host H]\n');
  process.exit(msg ? 2 : 0);
}

const MAX_BYTES = 4 * 1024 * 1024;
const MAX_BODY = 8 * 1024 * 1024;
const PERIOD = Buffer.alloc(65536);
for (let i = 0; i < 65536; i++) PERIOD[i] = ((7 * i) + (i >> 8)) & 0xff;
const TEST_BYTES = Buffer.alloc(MAX_BYTES);
for (let off = 0; off < MAX_BYTES; off += PERIOD.length) PERIOD.copy(TEST_BYTES, off);

function send(res, status, body, type) {
  res.writeHead(status, {
    'Content-Type': type,
    'Content-Length': body.length,
  });
  res.end(body);
}

function sendJson(res, status, obj) {
  send(res, status, Buffer.from(JSON.stringify(obj)), 'application/json; charset=utf-8');
}

const args = parseArgs(process.argv.slice(2));
function handle(req, res) {
  const path = req.url.split('?', 1)[0];
  const m = /^\/api\/test\/bytes\/(\d+)$/.exec(path);
  if (m && req.method === 'GET') {
    req.resume();
    const n = Number(m[1]);
    if (n > MAX_BYTES) {
      return sendJson(res, 400, { error: 'bad_request', status: 400, detail: `n must be 0..${MAX_BYTES}` });
    }
    return send(res, 200, TEST_BYTES.subarray(0, n), 'application/octet-stream');
  }
  if (path === '/api/test/echo' && req.method === 'POST') {
    const chunks = [];
    let total = 0;
    let tooBig = false;
    req.on('data', (c) => {
      total += c.length;
      if (total > MAX_BODY) tooBig = true; else chunks.push(c);
    });
    req.on('end', () => {
      if (tooBig) {
        if (!args.h2) res.setHeader('Connection', 'close');
        return sendJson(res, 413, { error: 'payload_too_large', status: 413 });
      }
      send(res, 200, Buffer.concat(chunks, total), req.headers['content-type'] || 'application/octet-stream');
    });
    return undefined;
  }
  req.resume();
  return sendJson(res, 404, { error: 'not_found', status: 404 });
}

const tls = { cert: fs.readFileSync(args.cert), key: fs.readFileSync(args.key) };
const server = args.h2
  ? http2.createSecureServer({ ...tls, allowHTTP1: false }, handle)
  : https.createServer({ ...tls, ALPNProtocols: ['http/1.1'], keepAlive: true }, handle);
if (!args.h2) {
  server.keepAliveTimeout = 65000;
  server.headersTimeout = 66000;
  server.requestTimeout = 0;
  server.maxRequestsPerSocket = 0;
}
server.on('tlsClientError', () => {});
const sessions = new Set();
server.on('session', (s) => { sessions.add(s); s.on('close', () => sessions.delete(s)); });

server.listen(args.port, args.host, () => {
  process.stdout.write(`READY ${server.address().port}\n`);
});

function shutdown() {
  server.close(() => process.exit(0));
  if (server.closeAllConnections) server.closeAllConnections();
  for (const s of sessions) s.destroy();
  setTimeout(() => process.exit(0), 2000).unref();
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
