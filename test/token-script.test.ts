/**
 * scripts/token.js, the README's way to mint a token for trying the gateway
 * out: a --ttl it cannot read is refused, never turned into a token that
 * the gateway then calls malformed.
 */
import t from 'tap'
import { execFile } from 'node:child_process'
import { join } from 'node:path'
import { TEST_SECRET } from './helpers'

const SCRIPT = join(__dirname, '..', '..', 'scripts', 'token.js')

async function mint (args: string[]): Promise<{ code: number, stdout: string, stderr: string }> {
  return await new Promise((resolve) => {
    execFile(process.execPath, [SCRIPT, ...args], { env: { PATH: process.env.PATH ?? '', JWT_SECRET: TEST_SECRET }, timeout: 15_000 }, (error, stdout, stderr) => {
      resolve({ code: error === null ? 0 : typeof error.code === 'number' ? error.code : -1, stdout, stderr })
    })
  })
}

function claimsOf (jwt: string): Record<string, unknown> {
  return JSON.parse(Buffer.from(jwt.trim().split('.')[1], 'base64url').toString()) as Record<string, unknown>
}

t.test('--ttl in seconds sets exp that far after iat', async (t) => {
  const minted = await mint(['--sub', 'u1', '--ttl', '60'])
  t.equal(minted.code, 0)
  const claims = claimsOf(minted.stdout)
  t.equal(Number(claims.exp) - Number(claims.iat), 60)
  t.equal(claims.sub, 'u1')
})

t.test('a --ttl that is not whole seconds, or none after the flag, is refused with exit 1 and no token', async (t) => {
  for (const args of [['--ttl', '1h'], ['--ttl'], ['--ttl', '-5']]) {
    const minted = await mint(args)
    t.equal(minted.code, 1, `${args.join(' ')}: exit 1`)
    t.equal(minted.stdout, '', 'no token')
    t.match(minted.stderr, /--ttl takes whole seconds/)
  }
})
