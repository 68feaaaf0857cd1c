#!/usr/bin/env node
// Mints an HS256 token signed with JWT_SECRET, for trying the gateway out.
//   npm run token -- --sub u1 [--roles publisher,admin] [--topics 'news,chat:*'] [--ttl 3600]
'use strict'
const { createHmac } = require('node:crypto')

const args = process.argv.slice(2)
const option = (name, fallback) => {
  const index = args.indexOf(`--${name}`)
  return index === -1 ? fallback : args[index + 1]
}
const secret = process.env.JWT_SECRET
if (!secret) {
  process.stderr.write('JWT_SECRET must be set (the same secret the gateway uses)\n')
  process.exit(1)
}
const now = Math.floor(Date.now() / 1000)
const ttl = option('ttl', '3600')
if (!/^\d+$/.test(ttl ?? '')) {
  process.stderr.write(`--ttl takes whole seconds (e.g. --ttl 3600), not ${JSON.stringify(ttl ?? null)}\n`)
  process.exit(1)
}
const payload = { sub: option('sub', 'u1'), iat: now, exp: now + Number(ttl) }
const roles = option('roles')
if (roles) payload.roles = roles.split(',').filter(Boolean)
const topics = option('topics')
if (topics) payload.topics = topics.split(',').filter(Boolean)
if (process.env.JWT_ISSUER) payload.iss = process.env.JWT_ISSUER
if (process.env.JWT_AUDIENCE) payload.aud = process.env.JWT_AUDIENCE

const encode = (value) => Buffer.from(JSON.stringify(value)).toString('base64url')
const unsigned = `${encode({ alg: 'HS256', typ: 'JWT' })}.${encode(payload)}`
const signature = createHmac('sha256', secret).update(unsigned).digest('base64url')
process.stdout.write(`${unsigned}.${signature}\n`)
