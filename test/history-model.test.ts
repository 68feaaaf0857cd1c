/**
 * Embedded history against a model: random publishes to hot, warm and new
 * channels under a small HISTORY_MAX_BYTES, with replays (read page by page,
 * as streams read them) and reopen windows between them. Whatever the cap
 * and HISTORY_SIZE let go, a replay without `reset` holds every event of its
 * channels after the cursor, in id order, once; a window that is not
 * `trimmed` holds every event of its channels.
 */
import t, { type Test } from 'tap'
import { clockId } from '../src/core/bus'
import { MemoryBus } from '../src/core/memory-bus'
import { renderBody } from '../src/core/framing'
import { fakePerformanceNow } from './helpers/stream-core'

/** Deterministic, so that a failure replays the same way (mulberry32). */
function randomFrom (seed: number): () => number {
  let state = seed >>> 0
  return () => {
    state = (state + 0x6d2b79f5) >>> 0
    let mixed = state
    mixed = Math.imul(mixed ^ (mixed >>> 15), mixed | 1)
    mixed ^= mixed + Math.imul(mixed ^ (mixed >>> 7), mixed | 61)
    return ((mixed ^ (mixed >>> 14)) >>> 0) / 4294967296
  }
}

interface Published {
  id: number
  channels: Set<string>
}

/**
 * Random traffic on a bus, and every event it was given: hot channels, a
 * few hundred warm ones, new ones, and (when read) channels never published to.
 */
class Traffic {
  readonly log: Published[] = []
  private readonly hot = ['user:hot', 'topic:hot']
  private readonly warm = Array.from({ length: 300 }, (_, n) => `user:warm${n}`)
  private fresh = 0

  constructor (readonly random: () => number, private readonly bus: MemoryBus, private readonly largeBytes: number, private readonly largeShare: number) {}

  /** One event to one to four channels, now and then to a hundred and twenty. */
  publish (): void {
    const channels = new Set<string>()
    const count = 1 + Math.floor(this.random() * (this.random() < 0.1 ? 120 : 4))
    for (let n = 0; n < count; n++) {
      const kind = this.random()
      channels.add(kind < 0.2 ? this.pick(this.hot) : kind < 0.7 ? this.pick(this.warm) : `user:new${this.fresh++}`)
    }
    const body = renderBody('e', 'x'.repeat(this.random() < this.largeShare ? this.largeBytes : Math.floor(this.random() * 200)))
    const [id] = this.bus.publishNow([{ channels: [...channels], body }])
    this.log.push({ id, channels })
  }

  /** One to three channels a stream might hold. */
  channelsToRead (): string[] {
    return Array.from({ length: 1 + Math.floor(this.random() * 3) }, () => {
      const kind = this.random()
      return kind < 0.1 ? this.pick(this.hot) : kind < 0.7 ? this.pick(this.warm) : kind < 0.9 ? `user:new${Math.floor(this.random() * (this.fresh + 1))}` : `user:none${Math.floor(this.random() * 1000)}`
    })
  }

  /** Mostly a recent cursor, as reconnects have: older ones are mostly reset. */
  cursor (): number {
    return this.log[Math.max(0, this.log.length - 1 - Math.floor(this.random() ** 3 * 200))].id
  }

  /** Ids of the events to `channels` after `after`, up to `upTo`. */
  expectedOf (channels: string[], after: number, upTo = Number.POSITIVE_INFINITY): number[] {
    return this.log.filter((event) => event.id > after && event.id <= upTo && channels.some((name) => event.channels.has(name))).map((event) => event.id)
  }

  private pick<T> (items: T[]): T {
    return items[Math.floor(this.random() * items.length)]
  }
}

/** A replay read to its end page by page, as a stream reads it; null if it was reset. */
async function replayWhole (bus: MemoryBus, channels: string[], after: number): Promise<{ ids: number[], pages: number } | null> {
  const ids: number[] = []
  for (let from = after, pages = 1; ; pages++) {
    const page = await bus.replay(channels, from)
    if (page.reset !== null) return null
    ids.push(...page.events.map((event) => event.id))
    if (page.more !== true) return { ids, pages }
    from = ids[ids.length - 1]
  }
}

interface Tally {
  replaysWhole: number
  pagedReplays: number
  windowsWhole: number
  failures: number
}

interface Drive {
  /** Before each step (time passing, a sweep). */
  beforeStep?: () => void
  /** Where the window starts as it is read: events from there on are expected in it. */
  windowStart?: () => number
  /** Between a reopen's read of its window and its `trimmed`. */
  beforeTrimmed?: () => void
}

/**
 * 6 000 steps: publishes, replays of recent cursors read page by page, and
 * reopens' windows, each replay without reset and each window not
 * `trimmed` checked against the log.
 */
async function drive (t: Test, bus: MemoryBus, traffic: Traffic, { beforeStep, windowStart = () => 1, beforeTrimmed }: Drive = {}): Promise<Tally> {
  const { random } = traffic
  const tally: Tally = { replaysWhole: 0, pagedReplays: 0, windowsWhole: 0, failures: 0 }
  for (let step = 0; step < 6000 && tally.failures < 5; step++) {
    beforeStep?.()
    const roll = random()
    if (roll < 0.6) {
      traffic.publish()
    } else if (traffic.log.length > 0) {
      const channels = traffic.channelsToRead()
      if (roll < 0.85) {
        const after = traffic.cursor()
        const replay = await replayWhole(bus, channels, after)
        if (replay === null) continue
        const expected = traffic.expectedOf(channels, after)
        if (replay.ids.join() !== expected.join()) {
          tally.failures++
          t.fail(`step ${step}: replay of ${channels.join(' ')} after ${after} without reset: ${replay.ids.length} events in ${replay.pages} pages, ${expected.length} expected`)
        }
        if (replay.pages > 1) tally.pagedReplays++
        tally.replaysWhole++
      } else {
        const start = windowStart()
        const window = (await bus.window(channels)).map((event) => event.id)
        const newestRead = traffic.log[traffic.log.length - 1].id
        beforeTrimmed?.()
        if (await bus.trimmed(channels)) continue
        const expected = traffic.expectedOf(channels, start - 1, newestRead)
        if (window.join() !== expected.join()) {
          tally.failures++
          t.fail(`step ${step}: window of ${channels.join(' ')} not trimmed: ${window.length} events, ${expected.length} expected`)
        }
        tally.windowsWhole++
      }
    }
  }
  t.equal(tally.failures, 0, `${tally.replaysWhole} replays without reset and ${tally.windowsWhole} untrimmed windows were whole`)
  t.ok(tally.replaysWhole > 100, 'enough replays came without reset to mean something')
  t.ok(tally.windowsWhole >= 10, 'and enough windows without trimmed')
  return tally
}

// The 1 MB cap with larger events makes replays span pages (REPLAY_PAGE_BYTES).
const configs = [0, 1, 3, 1000].flatMap((historySize) => [
  { historySize, cap: 64 * 1024, largeBytes: 3000, largeShare: 0.05 },
  { historySize, cap: 1024 * 1024, largeBytes: 60_000, largeShare: 0.2 }
])

for (const { historySize, cap, largeBytes, largeShare } of configs) {
  t.test(`HISTORY_SIZE=${historySize}, a ${cap / 1024} KB cap: no replay or window misses an event without saying so`, async (t) => {
    const bus = new MemoryBus({ historySize, historyTtlS: 3600, maxHistoryBytes: cap })
    t.teardown(async () => await bus.close())
    const { pagedReplays } = await drive(t, bus, new Traffic(randomFrom(7919 * (historySize + 1) + cap), bus, largeBytes, largeShare))
    // Fewer than HISTORY_SIZE=1000 keeps make no page of 256 KB.
    if (cap > 256 * 1024 && historySize === 1000) t.ok(pagedReplays >= 5, `replays of several pages among them (${pagedReplays})`)
  })
}

/**
 * The same under a window of a second or two, on a clock the test moves:
 * events leave by age, records go by the sweep, and slots of the table of
 * marks are taken over once their marks leave the window. A reopen reads
 * its window and asks `trimmed` up to 0.9 s later, with publishes and maybe
 * a sweep between, as a slow open does; a window not `trimmed` then holds
 * every event of its channels from the window's start when it was read.
 */
for (const { historySize, cap, ttlS } of [0, 3, 1000].flatMap((historySize) => [
  { historySize, cap: 64 * 1024, ttlS: 1 },
  { historySize, cap: 1024 * 1024, ttlS: 2 }
])) {
  t.test(`HISTORY_SIZE=${historySize}, a ${cap / 1024} KB cap, a ${ttlS} s window on a moving clock: no replay or window misses an event without saying so`, async (t) => {
    const start = performance.now()
    let elapsedMs = 0
    fakePerformanceNow(t, () => start + elapsedMs)
    const bus = new MemoryBus({ historySize, historyTtlS: ttlS, maxHistoryBytes: cap })
    t.teardown(async () => await bus.close())
    const traffic = new Traffic(randomFrom(104_729 * (historySize + 1) + cap + ttlS), bus, 3000, 0.05)
    const { random } = traffic
    await drive(t, bus, traffic, {
      beforeStep: () => {
        // Mostly a few milliseconds a step, now and then most of a window.
        elapsedMs += random() < 0.01 ? random() * ttlS * 1000 : random() * 4
        if (random() < 0.005) bus['sweep']()
      },
      windowStart: () => clockId() - ttlS * 1_000_000,
      beforeTrimmed: () => {
        // The open's own work before it asks: time, other publishes, maybe a sweep.
        elapsedMs += random() * 900
        for (let n = Math.floor(random() * 20); n > 0; n--) traffic.publish()
        if (random() < 0.5) bus['sweep']()
      }
    })
  })
}
