/**
 * `npm run bench -- --quick` end to end: every scenario runs against the
 * baseline and the gateway (and S1–S3 against nginx + Nchan, which CI
 * installs), and its load is delivered completely and in order. Only
 * correctness is asserted here; speed is what the bench itself reports.
 */
import t, { type Test } from 'tap'
import { spawn } from 'node:child_process'
import { mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { findNchan } from '../bench/lib/nchan'
import { REDIS_URL, redisAnswers } from './helpers/redis'

const RUN_JS = join(__dirname, '..', 'bench', 'run.js')
// A quick run takes 1-1.5 min on a quiet machine; on a busy one (other
// suites, other work) it took over 100 s, and the bound is only there so a
// hung run cannot hold the suite.
const BENCH_TIMEOUT_MS = 240_000
// The file runs two benches: past .taprc's 120 s for a file.
t.setTimeout(2 * BENCH_TIMEOUT_MS + 60_000)

type Values = Record<string, number | null>
interface Result {
  scenarios: Array<{ id: string, runs: Record<string, { values: Values, notes: string[] }> }>
}

async function runBench (t: Test, args: string[]): Promise<{ code: number | null, output: string }> {
  const child = spawn(process.execPath, [RUN_JS, ...args], { stdio: ['ignore', 'pipe', 'pipe'] })
  let output = ''
  child.stdout.on('data', (chunk: Buffer) => { output += chunk.toString() })
  child.stderr.on('data', (chunk: Buffer) => { output += chunk.toString() })
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)))
  const timer = setTimeout(() => child.kill('SIGTERM'), BENCH_TIMEOUT_MS)
  t.teardown(async () => {
    clearTimeout(timer)
    if (child.exitCode === null && child.signalCode === null) {
      child.kill('SIGKILL')
      await exited
    }
  })
  const code = await exited
  clearTimeout(timer)
  return { code, output }
}

t.test('npm run bench -- --quick: every scenario, every server, all events delivered in order', { timeout: BENCH_TIMEOUT_MS + 10_000 }, async (t) => {
  const scenarios = ['s1', 's2', 's3', 's4', 's5']
  if (!await redisAnswers()) {
    // In CI, S4 must run: a missing Redis there is a failure.
    if (process.env.CI === 'true') t.fail(`no Redis at ${REDIS_URL} (CI must provide one)`)
    else t.comment(`S4 left out: no Redis at ${REDIS_URL}`)
    scenarios.splice(scenarios.indexOf('s4'), 1)
  }
  const nchan = findNchan() !== null
  if (!nchan) {
    // CI installs Debian's libnginx-mod-nchan: there the peer must be measured.
    if (process.env.CI === 'true') t.fail('nginx with Nchan\'s module is not installed (CI must provide it)')
    else t.comment('nginx + Nchan left out: not installed (apt-get install nginx libnginx-mod-nchan)')
  }
  const dir = mkdtempSync(join(tmpdir(), 'bench-smoke-'))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  const out = join(dir, 'result.json')
  const { code, output } = await runBench(t, ['--quick', '--scenario', scenarios.join(','), '--duration', '3', '--redis-url', REDIS_URL, '--out', out])
  t.equal(code, 0, `the bench exits with 0${code === 0 ? '' : `:\n${output.slice(-3000)}`}`)
  const result = JSON.parse(readFileSync(out, 'utf8')) as Result
  t.same(result.scenarios.map((scenario) => scenario.id), scenarios, 'one result per scenario asked for')

  for (const scenario of result.scenarios) {
    const peer = nchan && ['s1', 's2', 's3'].includes(scenario.id)
    t.equal(scenario.runs.nchan !== undefined, peer, `${scenario.id}: nginx + Nchan ${peer ? 'ran' : 'did not run'}`)
    for (const target of peer ? ['baseline', 'gateway', 'nchan'] : ['baseline', 'gateway']) {
      const run = scenario.runs[target]
      const what = `${scenario.id} ${target}`
      if (!t.ok(run, `${what} ran`)) continue
      const v = run.values
      switch (scenario.id) {
        case 's1':
          // The bench's notes say why opens failed (e.g. failed opens: {"http_401":500}).
          t.equal(v.established, 500, `${what}: 500 streams open${v.established === 500 ? '' : ` (${run.notes.join('; ')})`}`)
          t.equal(v.failed, 0, `${what}: no failed open`)
          t.type(v.open_all_second_s, 'number', `${what}: the second round ran`)
          t.type(v.open_all_warm_s, 'number', `${what}: the third (warm) round ran`)
          break
        case 's5':
          t.equal(v.failed, 0, `${what}: no failed open`)
          t.ok((v.opened ?? 0) > (v.streams ?? 0), `${what}: streams were replaced while events flowed`)
          t.equal(v.out_of_order, 0, `${what}: in order`)
          t.equal(v.gaps, 0, `${what}: no gaps`)
          t.equal(v.fds_after_close, v.fds_start, `${what}: descriptors back to where they started`)
          t.equal(v.handles_after_close, v.handles_start, `${what}: handles back to where they started`)
          t.equal(v.connections_after_close, 0, `${what}: no stream left in the server's registry`)
          break
        default:
          t.equal(v.completeness_pct, 100, `${what}: every event reached every stream`)
          t.equal(v.out_of_order, 0, `${what}: in order`)
          t.equal(v.gaps, 0, `${what}: no gaps`)
      }
      // Nchan's memory and CPU are read from its worker process: blanks would mean the wrong pid.
      if (target === 'nchan') {
        if (scenario.id === 's1') {
          t.ok((v.rss_per_stream_kb ?? 0) > 0, `${what}: RSS per stream was measured`)
          // 500 opens cost Nchan about one 10 ms clock tick, so 0 is a real reading; a wrong pid reads as null.
          t.ok(typeof v.server_cpu_per_open_us === 'number' && v.server_cpu_per_open_us >= 0, `${what}: CPU per open was measured`)
        } else {
          t.ok((v.server_cpu_pct ?? 0) > 0, `${what}: server CPU was measured`)
        }
      }
      // The machine's write floor is measured by the baseline, with one server on its core.
      if (target === 'baseline' && (scenario.id === 's2' || scenario.id === 's3')) {
        t.ok((v.floor_us_per_write ?? 0) > 0, `${what}: the write floor was measured`)
        const derived = scenario.id === 's2' ? v.floor_pass_ms : v.floor_core_pct
        t.ok((derived ?? 0) > 0, `${what}: and what it implies for the scenario`)
      }
    }
  }
  if (nchan) t.match(output, /gw\/nchan/, 'the table gives the gateway\'s ratio to nginx + Nchan')
})

t.test('--burst-rate paces the s2 burst instead of publishing it back to back, every event of it', { timeout: BENCH_TIMEOUT_MS + 10_000 }, async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'bench-rate-'))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  const out = join(dir, 'result.json')
  // 25 at 42/s: a count derived back from the duration (25000 / 42 × 42 / 1000) rounds down to 24.
  const events = 25
  const rate = 42
  const { code, output } = await runBench(t, ['--quick', '--scenario', 's2', '--targets', 'gateway', '--events', String(events), '--burst-rate', String(rate), '--out', out])
  t.equal(code, 0, `the bench exits with 0${code === 0 ? '' : `:\n${output.slice(-3000)}`}`)
  const result = JSON.parse(readFileSync(out, 'utf8')) as Result & { scenarios: Array<{ params: Record<string, unknown> }> }
  const [scenario] = result.scenarios
  t.equal(scenario.params.burstRate, rate, 'the rate is recorded with the run')
  const v = scenario.runs.gateway.values
  t.equal(v.completeness_pct, 100, 'every event was published and reached every stream')
  // The last event leaves (events − 1) intervals after the first, less the 1 ms the schedule allows and the clock's millisecond steps: never much faster than the rate.
  const fastest = events / ((events - 1) / rate - 0.003)
  t.ok((v.publish_rate ?? Infinity) <= fastest, `published no faster than ${rate} events/s (${v.publish_rate})`)
})
