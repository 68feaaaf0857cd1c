#!/usr/bin/env node
// Mints an HS256 token signed with JWT_SECRET, for trying the gateway out.
//   npm run token -- --sub u1 [--roles publisher,admin] [--topics 'news,chat:*'] [--ttl 3600]
'use strict'
const { createHmac } = require('node:crypto')

const USAGE = `usage: JWT_SECRET=... npm run token -- [--sub USER] [--roles publisher,admin] [--topics 'news,chat:*'] [--ttl SECONDS]
  --sub     the user id (default u1)
  --roles   comma-separated roles: publisher (publish routes), admin (admin routes)
  --topics  comma-separated topic patterns the token allows (default: any)
  --ttl     seconds until it expires (default 3600)
JWT_ISSUER and JWT_AUDIENCE, when set, become its iss and aud.
`
const FLAGS = new Set(['--sub', '--roles', '--topics', '--ttl'])
const args = process.argv.slice(2)
if (args.includes('--help') || args.includes('-h')) {
  process.stdout.write(USAGE)
  process.exit(0)
}
// An unknown flag (--role, --user) would be dropped silently, and its token
// then refused by the gateway for a reason far from the typo.
for (let index = 0; index < args.length; index += 2) {
  if (!FLAGS.has(args[index])) {
    process.stderr.write(`unknown option ${JSON.stringify(args[index])}\n${USAGE}`)
    process.exit(1)
  }
}
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
