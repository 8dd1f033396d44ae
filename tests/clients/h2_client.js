#!/usr/bin/env node
// h2_client.js: node's HTTP/2 client (static OpenSSL), many concurrent streams on one
// connection, for the end-to-end tests.
//
//   node h2_client.js --url https://127.0.0.1:P --ca CERT --paths /a,/b,... [--cookie "a=1; b=2"]
//                     [--timeout-ms 10000]
//
// Sends every path as a GET at once on one HTTP/2 session (cookie crumbs as separate fields,
// as browsers send them) and prints one JSON line: {"responses":[{"path","status","bytes"}...],
// "errors":[...]} in the order of --paths. A stream with no answer has status 0; what is still
// open after the timeout is given up (an error "timeout").
'use strict';

const fs = require('fs');
const http2 = require('http2');

const args = {};
for (let i = 2; i < process.argv.length; i += 2) args[process.argv[i].replace(/^--/, '')] = process.argv[i + 1];
const paths = args.paths.split(',');
const crumbs = args.cookie ? args.cookie.split('; ') : [];
const session = http2.connect(args.url, { ca: fs.readFileSync(args.ca), peerMaxConcurrentStreams: 1000 });
const errors = [];
session.on('error', (e) => errors.push(String(e)));

const all = paths.map((path) => new Promise((resolve) => {
  const headers = { ':method': 'GET', ':path': path };
  if (crumbs.length) headers.cookie = crumbs;
  const req = session.request(headers);
  let status = 0;
  let bytes = 0;
  req.on('response', (h) => { status = h[':status']; });
  req.on('data', (d) => { bytes += d.length; });
  req.on('end', () => resolve({ path, status, bytes }));
  req.on('error', (e) => { errors.push(`${path}: ${e}`); resolve({ path, status, bytes }); });
  req.on('close', () => resolve({ path, status, bytes }));
  req.end();
}));

const timer = setTimeout(() => {
  errors.push('timeout');
  session.destroy();
}, Number(args['timeout-ms'] || 10000));

Promise.all(all).then((responses) => {
  clearTimeout(timer);
  session.close();
  process.stdout.write(`${JSON.stringify({ responses, errors })}\n`);
});
