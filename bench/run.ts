/**
 * The benchmark suite: `npm run bench -- [flags]` (see --help). Each scenario
 * runs against the baseline (bench/baseline-server.ts), the gateway and, where
 * installed, nginx + Nchan, each a fresh child process pinned to one core, with
 * this process (load client and publisher) pinned to the other; prints a table
 * and writes bench/results/<timestamp>.json.
 */
import { spawnSync } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { existsSync, mkdirSync, readdirSync, rmSync, writeFileSync } from 'node:fs'
import { cpus } from 'node:os'
import { join } from 'node:path'
import { parseArgs } from 'node:util'
import { ClientPool } from './lib/client-pool'
import { clockWith, epochOffsetUs, sleep } from './lib/clock'
import { fileLimit, hasTaskset, machine, pinSelf } from './lib/proc'
import { renderProfile } from './lib/profile'
import { findNchan } from './lib/nchan'
import { freePort, PortTakenError, ROOT, ServerProcess, TARGET_KINDS, type TargetKind } from './lib/server'
import { formatNumber, gatewayRatio, renderTable } from './lib/table'
import { signToken, userTokens } from './lib/token'
import { awaitQuiet, type Context, type Options, type Scenario, type ScenarioResult } from './scenarios/common'
import { s1 } from './scenarios/s1-idle'
import { s2 } from './scenarios/s2-fanout'
import { s3 } from './scenarios/s3-steady'
import { s4 } from './scenarios/s4-redis'
import { s5 } from './scenarios/s5-churn'

const SCENARIOS: Scenario[] = [s1, s2, s3, s4, s5]
/** Descriptors this process keeps for itself beyond its streams. */
const FD_RESERVE = 200

const HELP = `npm run bench -- [options]

Scenarios (default: all, in order; each against the baseline, the gateway, then nginx + Nchan):
  s1  idle: open N streams (32 handshakes in flight); RSS per stream, time to open all
  s2  fan-out burst: N subscribers of one topic, E events back to back; deliveries/s, completeness, order, p50/p99
  s3  steady latency: N subscribers, R events/s for D s; p50/p99
  s4  Redis mode: 2 instances, subscribers split across them, a burst as in s2 (needs Redis)
  s5  churn / soak: N streams living a few seconds each while events flow, for D s;
      RSS over time, descriptors, handles, registry back to zero
  In s2 and s3 the baseline run also measures the machine's write floor: one bare
  socket.write to each open stream, and what that alone costs at the scenario's size.

Options:
  --scenario s1,s2     which scenarios (repeatable or comma list)
  --targets LIST       baseline,gateway,nchan (default: all three, nchan only where
                       nginx and Nchan's module are installed: Debian's nginx and
                       libnginx-mod-nchan, or $NGINX and $NCHAN_MODULE). Nchan runs
                       s1-s3 with one nginx worker; s4 and s5 measure the Node
                       servers only
  --quick              small sizes: a smoke run in under a minute
  --subscribers N      streams per scenario (defaults: s1 10000, s2 10000, s3 1000, s4 10000, s5 5000)
  --events E           events of the s2/s4 burst (default 200)
  --burst-rate R       publish the s2/s4 burst at R events/s instead of back to back
                       (s2 at s4's publish rate compares the two at the same load)
  --rate R             events/s for s3 (default 100) and s5 (default 5)
  --duration S         seconds for s3 (default 10) and s5 (default 120)
  --in-flight P        handshakes in flight while opening (default 32)
  --users K            distinct users the streams cycle through (default: one user per stream)
  --workers W          load-client worker threads (default 2)
  --server-cpu C       CPU for the server under test (default 0)
  --client-cpu C       CPU for this process, the client (default 1)
  --no-pin             no taskset pinning
  --redis-url URL      Redis for s4 (default $REDIS_URL or redis://127.0.0.1:6379)
  --log-level L        the gateway's LOG_LEVEL (default info; its logs go to a file)
  --cpu-prof           profile the gateway (node --cpu-prof) and print its top functions
  --settle-ms MS       pause before reading memory after opening (default 2000; --quick 1000)
  --src-ips K          spread client connections over 127.0.0.1..K
  --quiet-wait S       before each run, wait up to S s for the machine to be idle (default 10; --quick 0)
  --gateway-env K=V    extra environment for the gateway (repeatable), e.g. HISTORY_TTL_S=60
  --keep-logs          keep the servers' log files under bench/results/
  --out FILE           JSON results path (default bench/results/<timestamp>.json)
`

function parseOptions (argv: string[]): Options {
  const { values } = parseArgs({
    args: argv,
    strict: true,
    options: {
      scenario: { type: 'string', multiple: true },
      targets: { type: 'string' },
      quick: { type: 'boolean' },
      subscribers: { type: 'string' },
      events: { type: 'string' },
      'burst-rate': { type: 'string' },
      rate: { type: 'string' },
      duration: { type: 'string' },
      'in-flight': { type: 'string' },
      users: { type: 'string' },
      workers: { type: 'string' },
      'server-cpu': { type: 'string' },
      'client-cpu': { type: 'string' },
      'no-pin': { type: 'boolean' },
      'redis-url': { type: 'string' },
      'log-level': { type: 'string' },
      'cpu-prof': { type: 'boolean' },
      'settle-ms': { type: 'string' },
      'src-ips': { type: 'string' },
      'keep-logs': { type: 'boolean' },
      'quiet-wait': { type: 'string' },
      'gateway-env': { type: 'string', multiple: true },
      out: { type: 'string' },
      help: { type: 'boolean', short: 'h' }
    }
  })
  if (values.help === true) {
    process.stdout.write(HELP)
    process.exit(0)
  }
  const number = (name: string, raw: string | undefined, min: number, max: number): number | null => {
    if (raw === undefined) return null
    const value = Number(raw)
    if (!Number.isFinite(value) || value < min || value > max) throw new Error(`--${name} must be a number from ${min} to ${max}, got "${raw}"`)
    return value
  }
  const scenarios = (values.scenario ?? ['s1,s2,s3,s4,s5']).flatMap((item) => item.split(',')).map((item) => item.trim().toLowerCase()).filter((item) => item !== '')
  for (const id of scenarios) {
    if (!SCENARIOS.some((scenario) => scenario.id === id)) throw new Error(`unknown scenario "${id}" (s1..s5)`)
  }
  // Looking for nginx runs `nginx -t`: only when Nchan is asked for or the default may include it.
  const targets = (values.targets ?? (findNchan() !== null ? 'baseline,gateway,nchan' : 'baseline,gateway')).split(',').map((item) => item.trim())
  for (const target of targets) {
    if (!(TARGET_KINDS as readonly string[]).includes(target)) throw new Error(`unknown target "${target}" (${TARGET_KINDS.join(', ')})`)
  }
  if (targets.includes('nchan') && findNchan() === null) throw new Error('target nchan: nginx with Nchan\'s module was not found (Debian: apt-get install nginx libnginx-mod-nchan; or set NGINX and NCHAN_MODULE)')
  const gatewayEnv: Record<string, string> = {}
  for (const item of values['gateway-env'] ?? []) {
    const match = /^([A-Z_][A-Z0-9_]*)=(.*)$/.exec(item)
    if (match === null) throw new Error(`--gateway-env takes KEY=VALUE, got "${item}"`)
    gatewayEnv[match[1]] = match[2]
  }
  const pin = values['no-pin'] !== true && cpus().length >= 2 && hasTaskset()
  return {
    scenarios: SCENARIOS.map((scenario) => scenario.id).filter((id) => scenarios.includes(id)),
    targets: TARGET_KINDS.filter((target) => targets.includes(target)),
    quick: values.quick === true,
    subscribers: number('subscribers', values.subscribers, 1, 1_000_000),
    events: number('events', values.events, 1, 1_000_000),
    burstRate: number('burst-rate', values['burst-rate'], 0.1, 100_000),
    rate: number('rate', values.rate, 0.1, 100_000),
    duration: number('duration', values.duration, 1, 86_400),
    inFlight: number('in-flight', values['in-flight'], 1, 10_000) ?? 32,
    users: number('users', values.users, 1, 1_000_000),
    workers: number('workers', values.workers, 1, 64) ?? 2,
    serverCpu: pin ? values['server-cpu'] ?? '0' : null,
    clientCpu: pin ? values['client-cpu'] ?? '1' : null,
    redisUrl: values['redis-url'] ?? process.env.REDIS_URL ?? 'redis://127.0.0.1:6379',
    logLevel: values['log-level'] ?? 'info',
    cpuProf: values['cpu-prof'] === true,
    settleMs: number('settle-ms', values['settle-ms'], 0, 600_000) ?? (values.quick === true ? 1000 : 2000),
    srcIps: number('src-ips', values['src-ips'], 1, 250) ?? 1,
    keepLogs: values['keep-logs'] === true,
    gatewayEnv,
    quietWaitS: number('quiet-wait', values['quiet-wait'], 0, 3600) ?? (values.quick === true ? 0 : 10),
    out: values.out ?? null
  }
}

/**
 * N streams need about N descriptors here and N in the server. If the soft
 * limit is too low but the hard one allows it, re-run under a raised limit;
 * otherwise say so (scenarios then run with as many streams as fit).
 */
function ensureFileLimit (needed: number, argv: string[]): void {
  const limit = fileLimit()
  if (limit === null || limit.soft >= needed) return
  if (limit.hard >= needed && process.env.BENCH_NOFILE_RAISED === undefined) {
    process.stderr.write(`raising the file limit from ${limit.soft} to ${limit.hard} (ulimit -n) for ${needed} descriptors\n`)
    const result = spawnSync('/bin/sh', ['-c', 'ulimit -n "$1" || exit 97; shift; exec "$@"', 'sh', String(limit.hard), process.execPath, ...process.execArgv, __filename, ...argv], {
      stdio: 'inherit',
      env: { ...process.env, BENCH_NOFILE_RAISED: '1' }
    })
    if (result.status !== 97) process.exit(result.status ?? 1)
  }
  process.stderr.write(
    `WARNING: the file limit here is ${limit.soft} (hard ${limit.hard}); the largest scenario needs about ${needed}.\n` +
    `  Scenarios will open at most ${limit.soft - FD_RESERVE} streams and say so. Raise it with \`ulimit -n ${needed}\` (as root if above the hard limit).\n`
  )
}

function largestStreams (options: Options): number {
  if (options.subscribers !== null) return options.subscribers
  if (options.quick) return 500
  return options.scenarios.some((id) => id === 's1' || id === 's2' || id === 's4') ? 10_000 : 5000
}

/** The gateway version measured: HEAD and whether its sources differ from it. */
function gatewayVersion (): { commit: string | null, dirtyFiles: number | null } {
  const git = (args: string[]): string | null => {
    const result = spawnSync('git', args, { cwd: ROOT, encoding: 'utf8' })
    return result.status === 0 ? result.stdout.trim() : null
  }
  const dirty = git(['status', '--porcelain', '--', 'src', 'plugins', 'routes'])
  return { commit: git(['rev-parse', '--short', 'HEAD']), dirtyFiles: dirty === null ? null : dirty.split('\n').filter((line) => line !== '').length }
}

function timestamp (): string {
  return new Date().toISOString().replace(/[:.]/g, '-').replace('Z', '')
}

async function main (): Promise<void> {
  const argv = process.argv.slice(2)
  let options: Options
  try {
    options = parseOptions(argv)
  } catch (error) {
    process.stderr.write(`${error instanceof Error ? error.message : String(error)}\n\n${HELP}`)
    process.exit(2)
  }
  if (!existsSync(join(ROOT, 'dist', 'src', 'server.js'))) {
    process.stderr.write('dist/src/server.js is missing: run `npm run build` (npm run bench does)\n')
    process.exit(2)
  }
  ensureFileLimit(largestStreams(options) + FD_RESERVE, argv)
  const limit = fileLimit()
  const maxStreams = Math.max(1, (limit?.soft ?? 1024) - FD_RESERVE)

  const runId = timestamp()
  const resultsDir = join(ROOT, 'bench', 'results')
  const logDir = join(resultsDir, `${runId}-logs`)
  const profDir = join(resultsDir, `${runId}-prof`)
  mkdirSync(logDir, { recursive: true })
  if (options.cpuProf) mkdirSync(profDir, { recursive: true })

  const pinned = options.clientCpu !== null && pinSelf(options.clientCpu)
  const allCpus = `0-${cpus().length - 1}`
  const offset = epochOffsetUs()
  const pool = ClientPool.start(options.workers, offset)
  const secret = randomBytes(24).toString('base64url')
  const servers = new Set<ServerProcess>()
  const log = (message: string): void => { process.stderr.write(`[bench ${new Date().toISOString().slice(11, 19)}] ${message}\n`) }
  const tokenCache = new Map<number, string[]>()

  const ctx: Context = {
    options,
    clock: clockWith(offset),
    pool,
    secret,
    adminToken: signToken(secret, { sub: 'bench-admin', roles: ['admin'] }),
    publisherToken: signToken(secret, { sub: 'bench-publisher', roles: ['publisher'] }),
    maxStreams,
    results: new Map(),
    log,
    streamTokens (count) {
      const users = Math.min(count, options.users ?? count)
      let tokens = tokenCache.get(users)
      if (tokens === undefined) {
        tokens = userTokens(secret, users)
        tokenCache.set(users, tokens)
      }
      return tokens
    },
    pinClient (cpuList) {
      if (options.clientCpu !== null) pinSelf(cpuList ?? allCpus)
    },
    async startServer (kind: TargetKind, start) {
      const env: Record<string, string> = kind === 'gateway'
        ? {
            JWT_SECRET: secret,
            LOG_LEVEL: options.logLevel,
            MAX_CONNECTIONS_PER_USER: '1000000',
            RATE_LIMIT_STREAMS_PER_MIN: '0',
            RATE_LIMIT_PUBLISH_PER_MIN: '0',
            ...options.gatewayEnv,
            ...start.env
          }
        : { ...start.env }
      // A port free when asked may be taken by another process before the server binds it: then another one.
      for (let attempt = 1; ; attempt++) {
        const server = new ServerProcess({
          kind,
          label: start.label,
          host: '127.0.0.1',
          port: await freePort(),
          cpu: start.cpu,
          env,
          logFile: join(logDir, `${start.label}.log`),
          maxConnections: largestStreams(options) + FD_RESERVE,
          cpuProfDir: options.cpuProf && kind === 'gateway' ? profDir : undefined
        })
        servers.add(server)
        try {
          await server.start()
        } catch (error) {
          servers.delete(server)
          if (!(error instanceof PortTakenError) || attempt >= 3) throw error
          log(`${start.label}: ${error.message.split('\n')[0]}; another port`)
          continue
        }
        log(`${start.label}: pid ${server.pid} on ${server.url}${start.cpu === null ? '' : ` (CPU ${start.cpu})`}`)
        return server
      }
    },
    async stopServer (server) {
      await server.stop()
      servers.delete(server)
    }
  }

  // Everything stops by itself: a watchdog far beyond any scenario's own bounds.
  let stopping = false
  const abort = (why: string, code: number): void => {
    if (stopping) return
    stopping = true
    log(`${why}: stopping servers`)
    Promise.all([...servers].map((server) => server.stop(3000))).finally(() => process.exit(code))
  }
  const watchdogMin = 20 + (options.duration ?? 0) * options.scenarios.length / 30
  setTimeout(() => abort(`watchdog: still running after ${watchdogMin.toFixed(0)} min`, 3), watchdogMin * 60_000).unref()
  process.on('SIGINT', () => abort('interrupted', 130))
  process.on('SIGTERM', () => abort('terminated', 143))

  const info = machine()
  const version = gatewayVersion()
  log(`gateway at ${version.commit ?? '?'}${version.dirtyFiles !== null && version.dirtyFiles > 0 ? ` + ${version.dirtyFiles} changed source files` : ''}`)
  log(`machine: ${info.nproc} CPUs (${info.cpuModel}), ${info.memTotalMiB} MiB, load ${info.loadAverage ?? '?'}; node ${info.node}; file limit ${limit?.soft ?? '?'}`)
  log(pinned ? `servers on CPU ${options.serverCpu ?? ''}, client (this process, ${options.workers} workers) on CPU ${options.clientCpu ?? ''}` : 'no CPU pinning (taskset missing, one CPU, or --no-pin)')

  const results: ScenarioResult[] = []
  const started = Date.now()
  for (const scenario of SCENARIOS.filter((item) => options.scenarios.includes(item.id))) {
    const params = scenario.params(ctx)
    const result: ScenarioResult = { id: scenario.id, title: scenario.title, params, metrics: scenario.metrics, runs: {}, notes: [] }
    for (const kind of options.targets) {
      if (scenario.supports !== undefined && !scenario.supports.includes(kind)) continue
      log(`${scenario.title} → ${kind} ${JSON.stringify(params)}`)
      const begun = Date.now()
      try {
        await pool.reset()
        const quiet = options.quietWaitS > 0 ? await awaitQuiet(options.quietWaitS * 1000) : null
        if (quiet !== null && quiet.waitedMs > 1500) log(`  waited ${(quiet.waitedMs / 1000).toFixed(0)} s for an idle machine (CPUs ${quiet.busyPct.toFixed(0)} % busy)`)
        const run = await scenario.run(ctx, kind)
        if (quiet !== null) {
          run.details.machineBusyBeforePct = quiet.busyPct
          if (quiet.busyPct >= 15) run.notes.push(`machine was ${quiet.busyPct.toFixed(0)} % busy before the run (waited ${(quiet.waitedMs / 1000).toFixed(0)} s)`)
        }
        result.runs[kind] = run
        for (const note of run.notes) log(`  note: ${note}`)
        log(`  done in ${((Date.now() - begun) / 1000).toFixed(1)} s: ${scenario.metrics.slice(0, 6).map((metric) => `${metric.key}=${formatNumber(run.values[metric.key])}`).join(' ')}`)
      } catch (error) {
        const message = error instanceof Error ? error.message : String(error)
        result.runs[kind] = { error: message }
        log(`  FAILED: ${message}`)
        await pool.closeAll(true).catch(() => 0)
      }
      await sleep(500)
    }
    scenario.finish?.(ctx, result)
    ctx.results.set(scenario.id, result)
    results.push(result)
  }

  // Figures, ratios and notes.
  process.stdout.write(`\n${renderTable(results)}\n`)
  for (const result of results) {
    for (const note of result.notes) process.stdout.write(`${result.id.toUpperCase()}: ${note}\n`)
    for (const kind of options.targets) {
      const run = result.runs[kind]
      if (run === undefined) continue
      if ('error' in run) process.stdout.write(`${result.id.toUpperCase()} ${kind}: ERROR ${run.error.split('\n')[0]}\n`)
      else for (const note of run.notes) process.stdout.write(`${result.id.toUpperCase()} ${kind}: ${note}\n`)
    }
  }

  const profiles: string[] = []
  if (options.cpuProf) {
    await sleep(500)
    for (const file of readdirSync(profDir).filter((name) => name.endsWith('.cpuprofile')).sort()) {
      const text = renderProfile(join(profDir, file), ROOT, 20)
      profiles.push(text)
      process.stdout.write(`\n${text}\n`)
    }
  }

  const outFile = options.out ?? join(resultsDir, `${runId}.json`)
  const json = {
    runId,
    startedAt: new Date(started).toISOString(),
    elapsedS: (Date.now() - started) / 1000,
    machine: info,
    gateway: version,
    fileLimit: limit,
    pinning: pinned ? { server: options.serverCpu, client: options.clientCpu } : null,
    options,
    scenarios: results.map((result) => ({
      ...result,
      ratios: Object.fromEntries(result.metrics.map((metric) => [metric.key, gatewayRatio(result, metric, 'baseline')])),
      ratiosToNchan: result.runs.nchan === undefined
        ? null
        : Object.fromEntries(result.metrics.map((metric) => [metric.key, gatewayRatio(result, metric, 'nchan')]))
    })),
    profiles
  }
  mkdirSync(join(outFile, '..'), { recursive: true })
  writeFileSync(outFile, `${JSON.stringify(json, null, 1)}\n`)
  const clientShare = results.flatMap((result) => Object.values(result.runs))
    .map((run) => run !== undefined && !('error' in run) ? run.values.client_cpu_pct ?? run.values.client_cpu_open_pct : null)
    .filter((value): value is number => typeof value === 'number')
  process.stdout.write(`\nclient CPU (this process, all threads) peaked at ${formatNumber(Math.max(0, ...clientShare))} % of one core` +
    `${pinned ? ` (pinned to CPU ${options.clientCpu ?? ''}: near 100 % means the client, not the server, set the pace)` : ''}\n`)
  process.stdout.write(`results: ${outFile} (${((Date.now() - started) / 1000).toFixed(0)} s)\n`)

  const failed = results.some((result) => Object.values(result.runs).some((run) => run !== undefined && 'error' in run))
  if (!options.keepLogs && !failed) rmSync(logDir, { recursive: true, force: true })
  else process.stdout.write(`server logs: ${logDir}\n`)
  await pool.stop()
  process.exit(failed ? 1 : 0)
}

main().catch((error: unknown) => {
  process.stderr.write(`bench failed: ${error instanceof Error ? error.stack ?? error.message : String(error)}\n`)
  process.exit(1)
})
