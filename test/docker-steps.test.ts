/**
 * Docker cannot run here, so the Dockerfile's runtime stage is replayed as
 * plain steps: production dependencies installed with `npm ci --omit=dev` in a
 * scratch copy, the compiled code and pages copied as its COPY lines say, the
 * server started from there, probed with the image's own HEALTHCHECK command,
 * and stopped with its STOPSIGNAL. The Dockerfile's required items are checked
 * as text.
 */
import t from 'tap'
import { spawn } from 'node:child_process'
import { existsSync } from 'node:fs'
import { cp, mkdtemp, readFile, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { freePort, listensOn, openStream, TEST_SECRET } from './helpers'

/** The checkout's root (this file runs as dist/test/docker-steps.test.js). */
const ROOT = join(__dirname, '..', '..')

interface Stage {
  from: string
  lines: string[]
}

/** The stage's exec-form CMD (`CMD ["node", ...]`) as its argument list, or null. */
function execCommand (stage: Stage): string[] | null {
  const line = stage.lines.find((item) => item.startsWith('CMD'))
  const form = line === undefined ? null : /^CMD\s+(\[.*\])$/.exec(line)
  if (form === null) return null
  const parsed = JSON.parse(form[1]) as unknown
  return Array.isArray(parsed) && parsed.every((item) => typeof item === 'string') ? parsed as string[] : null
}

/** The Dockerfile's instructions (continuation lines joined, comments dropped), per stage. */
function stages (dockerfile: string): Stage[] {
  const instructions = dockerfile
    .replace(/\\\r?\n/g, ' ')
    .split(/\r?\n/)
    .map((line) => line.trim())
    .filter((line) => line !== '' && !line.startsWith('#'))
  const result: Stage[] = []
  for (const line of instructions) {
    if (/^FROM\s/i.test(line)) result.push({ from: line, lines: [] })
    else result.at(-1)?.lines.push(line)
  }
  return result
}

interface Run {
  code: number | null
  output: string
}

async function run (command: string, args: string[], options: { cwd?: string, env: NodeJS.ProcessEnv, timeoutMs: number }): Promise<Run> {
  const child = spawn(command, args, { cwd: options.cwd, env: options.env, stdio: ['ignore', 'pipe', 'pipe'] })
  let output = ''
  child.stdout?.setEncoding('utf8').on('data', (chunk: string) => { output += chunk })
  child.stderr?.setEncoding('utf8').on('data', (chunk: string) => { output += chunk })
  return await new Promise<Run>((resolve) => {
    const timer = setTimeout(() => {
      output += `\n[killed after ${options.timeoutMs} ms]`
      child.kill('SIGKILL')
    }, options.timeoutMs)
    child.once('exit', (code) => {
      clearTimeout(timer)
      resolve({ code, output })
    })
  })
}

/** The test runner's environment without npm's lifecycle variables (npm_config_* would steer the inner npm). */
function npmEnv (): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {}
  for (const [name, value] of Object.entries(process.env)) {
    if (!/^npm_/i.test(name)) env[name] = value
  }
  return { ...env, NODE_ENV: 'production' }
}

const NETWORK_ERROR = /ENOTFOUND|EAI_AGAIN|ECONNREFUSED|ECONNRESET|ETIMEDOUT|ENETUNREACH|ENOTCACHED|network/i

t.test('the Dockerfile has what the deployment needs', async (t) => {
  const dockerfile = await readFile(join(ROOT, 'Dockerfile'), 'utf8')
  const all = stages(dockerfile)
  t.ok(all.length >= 2, `multi-stage (${all.length} stages)`)
  const build = all.find((stage) => /\sAS\s+build\b/i.test(stage.from))
  t.ok(build, 'a stage named build')
  t.ok(build?.lines.some((line) => /^RUN\s+npm ci\b/.test(line) && !line.includes('--omit=dev')), 'the build stage installs dev dependencies')
  t.ok(build?.lines.some((line) => /npm run build|tsc/.test(line)), 'the build stage compiles')
  const runtime = all[all.length - 1]
  t.not(runtime, build, 'the last (runtime) stage is not the build stage')
  t.ok(runtime.lines.some((line) => /^RUN\s+npm ci\b.*--omit=dev/.test(line)), 'the runtime stage installs production dependencies only (npm ci --omit=dev)')
  t.notOk(runtime.lines.some((line) => /npm run build|\btsc\b/.test(line)), 'the runtime stage does not compile')
  t.ok(runtime.lines.some((line) => /^COPY\s+--from=build\s/.test(line)), 'the runtime stage copies the compiled code from the build stage')
  const user = runtime.lines.filter((line) => /^USER\s/i.test(line)).at(-1)?.split(/\s+/)[1]
  t.ok(user !== undefined && !/^(root|0)(:|$)/.test(user), `runs as a non-root user (USER ${user ?? 'missing'})`)
  t.ok(runtime.lines.some((line) => /^HEALTHCHECK\s.*\bCMD\b.*\/health\b/.test(line)), 'HEALTHCHECK probes /health')
  t.ok(runtime.lines.some((line) => /^STOPSIGNAL\s+SIGTERM$/.test(line)), 'STOPSIGNAL SIGTERM')
  const command = execCommand(runtime)
  t.equal(command?.[0], 'node', 'exec-form CMD: node itself is PID 1 and gets the signal')
  t.equal(command?.at(-1), 'dist/src/server.js', 'CMD runs the compiled server')
  const start = (JSON.parse(await readFile(join(ROOT, 'package.json'), 'utf8')) as { scripts: Record<string, string> }).scripts.start
  t.equal(command?.join(' '), start, 'CMD is what `npm start` runs, Node flags included')
  t.ok(runtime.lines.some((line) => /^ENV\s.*\bPORT=\d+/.test(line)), 'PORT is set in the image (and read at start)')

  // The drain must fit the orchestrator's grace period (compose's stop_grace_period).
  const compose = await readFile(join(ROOT, 'docker-compose.yml'), 'utf8')
  const grace = /stop_grace_period:\s*(\d+)s/.exec(compose)
  const drain = /SHUTDOWN_TIMEOUT_MS:\s*"?(\d+)"?/.exec(compose)
  t.ok(grace !== null && drain !== null, 'docker-compose.yml sets stop_grace_period and SHUTDOWN_TIMEOUT_MS')
  if (grace !== null && drain !== null) {
    t.ok(Number(drain[1]) < Number(grace[1]) * 1000, `the drain (${drain[1]} ms) ends before the grace period (${grace[1]} s)`)
  }
})

/** The lines nested under `key:` found at `indent` spaces (a reader for this file's plain YAML). */
function yamlBlock (lines: string[], key: string, indent: number): string[] {
  const start = lines.findIndex((line) => line === `${' '.repeat(indent)}${key}:` || line.startsWith(`${' '.repeat(indent)}${key}: `))
  if (start === -1) return []
  const block: string[] = []
  for (const line of lines.slice(start + 1)) {
    if (line.trim() === '' || line.trim().startsWith('#')) continue
    if (line.length - line.trimStart().length <= indent) break
    block.push(line)
  }
  return block
}

t.test('docker-compose.yml: Redis, two gateways in Redis mode, nginx in front with deploy/nginx.conf, the publish port kept inside', async (t) => {
  const lines = (await readFile(join(ROOT, 'docker-compose.yml'), 'utf8')).split('\n')
  const services = yamlBlock(lines, 'services', 0)
  const names = services.filter((line) => /^ {2}[a-z][\w-]*:$/.test(line)).map((line) => line.trim().slice(0, -1))
  t.same(names.sort(), ['gateway-a', 'gateway-b', 'nginx', 'redis'], 'the four services')
  const gateway = yamlBlock(lines, 'x-gateway', 0)
  for (const name of ['gateway-a', 'gateway-b']) {
    t.same(yamlBlock(services, name, 2).map((line) => line.trim()), ['<<: *gateway'], `${name} is the shared gateway definition`)
  }
  const environment = yamlBlock(gateway, 'environment', 2).map((line) => line.trim())
  t.ok(environment.includes('REDIS_URL: redis://redis:6379'), 'the gateways share the compose Redis')
  t.ok(environment.includes('INTERNAL_PORT: "3001"'), 'publish and admin routes on the internal port')
  t.same(yamlBlock(gateway, 'expose', 2).map((line) => line.trim()).sort(), ['- "3000"', '- "3001"'], 'ports exposed to the compose network only')
  t.same(yamlBlock(gateway, 'ports', 2), [], 'no gateway port is published on the host')
  const nginx = yamlBlock(services, 'nginx', 2)
  t.ok(yamlBlock(nginx, 'volumes', 4).some((line) => line.trim() === '- ./deploy/nginx.conf:/etc/nginx/nginx.conf:ro'), 'nginx runs deploy/nginx.conf')
  t.equal(yamlBlock(nginx, 'ports', 4).length, 1, 'nginx is the one published port')
  const nginxAddress = /ipv4_address:\s*([\d.]+)/.exec(nginx.join('\n'))?.[1]
  t.ok(environment.includes(`TRUST_PROXY: ${nginxAddress ?? 'missing'}`), 'the gateways trust X-Forwarded-For from nginx\'s fixed address only')
  // Docker assigns addresses in order: one inside the dynamic range could go to another container first.
  const compose = await readFile(join(ROOT, 'docker-compose.yml'), 'utf8')
  const range = /ip_range:\s*172\.30\.0\.(\d+)\/25/.exec(compose)
  t.ok(range !== null && Number(nginxAddress?.split('.')[3]) < Number(range[1]), 'nginx\'s fixed address lies outside the range Docker assigns from')
  const conf = await readFile(join(ROOT, 'deploy', 'nginx.conf'), 'utf8')
  const upstreams = [...conf.matchAll(/^\s*server\s+([\w.-]+:\d+)[^;]*;/gm)].map((match) => match[1])
  t.same(upstreams.sort(), ['gateway-a:3000', 'gateway-b:3000'], 'nginx proxies to both gateways\' public port, never the internal one')
})

t.test('the runtime stage, step by step outside Docker: npm ci --omit=dev, copy, start, health, SIGTERM', async (t) => {
  const dockerfile = await readFile(join(ROOT, 'Dockerfile'), 'utf8')
  const runtime = stages(dockerfile).at(-1) as Stage
  const copies = runtime.lines
    .filter((line) => /^COPY\s+--from=build\s/.test(line))
    .map((line) => line.split(/\s+/)[2])
  // The build stage compiles a context without test/ and bench/ (.dockerignore): its dist holds these.
  const handled: Record<string, string[]> = {
    '/app/dist': ['dist/src', 'dist/plugins', 'dist/routes'],
    '/app/public': ['public'],
    '/app/scripts': ['scripts']
  }
  const healthcheck = /^HEALTHCHECK\s.*?\bCMD\s+(.+)$/.exec(runtime.lines.find((line) => line.startsWith('HEALTHCHECK')) ?? '')?.[1]
  const dir = await mkdtemp(join(tmpdir(), 'sse-docker-steps-'))
  t.teardown(async () => await rm(dir, { recursive: true, force: true }))
  // COPY package.json package-lock.json ./
  await cp(join(ROOT, 'package.json'), join(dir, 'package.json'))
  await cp(join(ROOT, 'package-lock.json'), join(dir, 'package-lock.json'))
  // RUN npm ci --omit=dev --no-audit --no-fund (the npm cache is used when it holds the packages).
  const install = await run('npm', ['ci', '--omit=dev', '--ignore-scripts', '--no-audit', '--no-fund', '--prefer-offline'], {
    cwd: dir,
    env: npmEnv(),
    timeoutMs: 120_000
  })
  if (install.code !== 0 && NETWORK_ERROR.test(install.output) && process.env.CI !== 'true') {
    t.comment(install.output.slice(-2000))
    t.plan(0, 'skipped: npm could not reach the registry (and its cache lacks a package), so the install step cannot be replayed here')
    return
  }
  t.same([...copies].sort(), Object.keys(handled).sort(), 'the runtime stage copies dist, public and scripts from the build stage (this test mirrors those)')
  t.ok(healthcheck, 'the HEALTHCHECK command is found')

  // --ignore-scripts changes nothing only if no production dependency has an install script.
  const lock = JSON.parse(await readFile(join(ROOT, 'package-lock.json'), 'utf8')) as { packages: Record<string, { dev?: boolean, hasInstallScript?: boolean }> }
  const scripted = Object.entries(lock.packages).filter(([name, info]) => name !== '' && info.dev !== true && info.hasInstallScript === true).map(([name]) => name)
  t.same(scripted, [], 'no production dependency has an install script, so --ignore-scripts installs what the image installs')

  t.equal(install.code, 0, `npm ci --omit=dev succeeds${install.code !== 0 ? `: ${install.output.slice(-2000)}` : ''}`)
  if (install.code !== 0) return
  t.ok(existsSync(join(dir, 'node_modules', 'fastify', 'package.json')), 'production dependencies are installed')
  for (const dev of ['typescript', 'tap', 'playwright-core', '@types/node']) {
    t.notOk(existsSync(join(dir, 'node_modules', dev)), `dev dependency ${dev} is not installed`)
  }

  // COPY --from=build /app/dist ./dist, /app/public ./public, /app/scripts ./scripts
  for (const paths of Object.values(handled)) {
    for (const path of paths) await cp(join(ROOT, path), join(dir, path), { recursive: true })
  }

  // An operator may run `npm start` in the image instead of its CMD: with no
  // compiler there, what runs before it must not try to compile.
  const prestart = await run('npm', ['run', 'prestart'], { cwd: dir, env: npmEnv(), timeoutMs: 60_000 })
  t.equal(prestart.code, 0, `\`npm start\`'s prestart passes without dev dependencies${prestart.code !== 0 ? `: ${prestart.output.slice(-2000)}` : ''}`)

  // CMD as written, with the image's ENV (HOST narrowed to loopback on a shared machine).
  const command = execCommand(runtime)
  if (command === null) throw new Error('the Dockerfile has no exec-form CMD')
  const port = await freePort()
  const server = spawn(process.execPath, command.slice(1), {
    cwd: dir,
    env: { PATH: process.env.PATH ?? '/usr/bin:/bin', NODE_ENV: 'production', PORT: String(port), HOST: '127.0.0.1', JWT_SECRET: TEST_SECRET, LOG_LEVEL: 'warn' },
    stdio: ['ignore', 'pipe', 'pipe']
  })
  let stderr = ''
  server.stderr?.setEncoding('utf8').on('data', (chunk: string) => { stderr += chunk })
  server.stdout?.resume()
  const exited = new Promise<{ code: number | null, signal: NodeJS.Signals | null }>((resolve) => server.once('exit', (code, signal) => resolve({ code, signal })))
  t.teardown(async () => {
    if (server.exitCode === null && server.signalCode === null) {
      server.kill('SIGKILL')
      await exited
    }
  })
  const url = `http://127.0.0.1:${port}`
  const deadline = Date.now() + 20_000
  let health = 0
  while (health !== 200 && server.exitCode === null) {
    try {
      const response = await fetch(`${url}/health`, { signal: AbortSignal.timeout(2000) })
      await response.arrayBuffer()
      // Only the copy's own answer: another test's server may hold a port handed out twice.
      health = await listensOn(server.pid, port) ? response.status : 0
    } catch {
      // Not listening yet.
    }
    if (health === 200) break
    if (Date.now() > deadline) break
    await new Promise<void>((resolve) => setTimeout(resolve, 50))
  }
  t.equal(health, 200, `the copy serves GET /health 200${health !== 200 ? `; stderr: ${stderr}` : ''}`)
  if (health !== 200) return

  // HEALTHCHECK ... CMD node -e "fetch(...)": run in a shell, as Docker runs a shell-form CMD.
  const probeEnv = { PATH: process.env.PATH ?? '/usr/bin:/bin', PORT: String(port) }
  if (healthcheck !== undefined) {
    // The image's HOST (every address), then the address the copy listens on.
    for (const host of ['0.0.0.0', '127.0.0.1']) {
      const probe = await run('sh', ['-c', healthcheck], { cwd: dir, env: { ...probeEnv, HOST: host }, timeoutMs: 15_000 })
      t.equal(probe.code, 0, `the image's HEALTHCHECK command passes while the gateway runs (HOST=${host})${probe.code !== 0 ? `: ${probe.output}` : ''}`)
    }
    // It asks HOST: at an address the gateway does not listen on, it fails.
    const elsewhere = await run('sh', ['-c', healthcheck], { cwd: dir, env: { ...probeEnv, HOST: '127.0.0.3' }, timeoutMs: 15_000 })
    t.not(elsewhere.code, 0, 'with HOST=127.0.0.3, where nothing listens, it fails')
  }

  // The image ships scripts/token.js: mint the stream's token with it.
  const minted = await run(process.execPath, ['scripts/token.js', '--sub', 'u-docker'], { cwd: dir, env: { PATH: probeEnv.PATH, JWT_SECRET: TEST_SECRET }, timeoutMs: 15_000 })
  t.equal(minted.code, 0, 'scripts/token.js runs in the copy')
  const token = minted.output.trim()
  const stream = await openStream(`${url}/v1/stream?token=${token}`, { t })
  t.equal(stream.status, 200, `a stream opens with that token${stream.status !== 200 ? `: ${stream.text}` : ''}`)
  if (stream.status !== 200) return
  t.match(JSON.parse((await stream.nextEvent('connected')).data), { userId: 'u-docker' }, 'as the token\'s user')

  // STOPSIGNAL SIGTERM
  server.kill('SIGTERM')
  const shutdown = await stream.nextEvent('shutdown', 10_000)
  t.ok(shutdown, 'the open stream gets shutdown')
  await stream.waitEnd(10_000)
  t.pass('and is closed')
  let timer: NodeJS.Timeout | undefined
  const exit = await Promise.race([
    exited,
    new Promise<null>((resolve) => { timer = setTimeout(() => resolve(null), 15_000) })
  ])
  clearTimeout(timer)
  t.same(exit, { code: 0, signal: null }, `the process exits 0 after SIGTERM${exit?.code !== 0 ? `; stderr: ${stderr}` : ''}`)

  if (healthcheck !== undefined) {
    const probe = await run('sh', ['-c', healthcheck], { cwd: dir, env: probeEnv, timeoutMs: 15_000 })
    t.equal(probe.code, 1, 'the HEALTHCHECK command fails once the gateway is gone')
  }
})
