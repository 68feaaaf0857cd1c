/**
 * Embedded history against a model: random publishes to hot, warm and new
 * channels under a small HISTORY_MAX_BYTES, with replays (read page by page,
 * as streams read them) and reopen windows between them. Whatever the cap
 * and HISTORY_SIZE let go, a replay without `reset` holds every event of its
 * channels after the cursor, in id order, once; a window that is not
 * `trimmed` holds every event of its channels.
 */
import t from 'tap'
import { MemoryBus } from '../src/core/memory-bus'
import { renderBody } from '../src/core/framing'

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

// The 1 MB cap with larger events makes replays span pages (REPLAY_PAGE_BYTES).
const configs = [0, 1, 3, 1000].flatMap((historySize) => [
  { historySize, cap: 64 * 1024, largeBytes: 3000, largeShare: 0.05 },
  { historySize, cap: 1024 * 1024, largeBytes: 60_000, largeShare: 0.2 }
])

for (const { historySize, cap, largeBytes, largeShare } of configs) {
  t.test(`HISTORY_SIZE=${historySize}, a ${cap / 1024} KB cap: no replay or window misses an event without saying so`, async (t) => {
    const random = randomFrom(7919 * (historySize + 1) + cap)
    const pick = <T>(items: T[]): T => items[Math.floor(random() * items.length)]
    const bus = new MemoryBus({ historySize, historyTtlS: 3600, maxHistoryBytes: cap })
    t.teardown(async () => await bus.close())
    const hot = ['user:hot', 'topic:hot']
    const warm = Array.from({ length: 300 }, (_, n) => `user:warm${n}`)
    let fresh = 0
    const log: Published[] = []
    const expectedOf = (channels: string[], after: number): number[] =>
      log.filter((event) => event.id > after && channels.some((name) => event.channels.has(name))).map((event) => event.id)
    let replaysWhole = 0
    let pagedReplays = 0
    let windowsWhole = 0
    let failures = 0

    for (let step = 0; step < 6000 && failures < 5; step++) {
      const roll = random()
      if (roll < 0.6) {
        const channels = new Set<string>()
        const count = 1 + Math.floor(random() * (random() < 0.1 ? 120 : 4))
        for (let n = 0; n < count; n++) {
          const kind = random()
          channels.add(kind < 0.2 ? pick(hot) : kind < 0.7 ? pick(warm) : `user:new${fresh++}`)
        }
        const body = renderBody('e', 'x'.repeat(random() < largeShare ? largeBytes : Math.floor(random() * 200)))
        const [id] = bus.publishNow([{ channels: [...channels], body }])
        log.push({ id, channels })
      } else if (log.length > 0) {
        const channels = Array.from({ length: 1 + Math.floor(random() * 3) }, () => {
          const kind = random()
          return kind < 0.1 ? pick(hot) : kind < 0.7 ? pick(warm) : kind < 0.9 ? `user:new${Math.floor(random() * (fresh + 1))}` : `user:none${Math.floor(random() * 1000)}`
        })
        if (roll < 0.85) {
          // Mostly recent cursors, as reconnects have: older ones are mostly reset.
          const after = log[Math.max(0, log.length - 1 - Math.floor(random() ** 3 * 200))].id
          const ids: number[] = []
          let reset = false
          let pages = 0
          for (let from = after; ; pages++) {
            const page = await bus.replay(channels, from)
            if (page.reset !== null) {
              reset = true
              break
            }
            ids.push(...page.events.map((event) => event.id))
            if (page.more !== true) break
            from = ids[ids.length - 1]
          }
          if (reset) continue
          const expected = expectedOf(channels, after)
          if (ids.join() !== expected.join()) {
            failures++
            t.fail(`step ${step}: replay of ${channels.join(' ')} after ${after} without reset: ${ids.length} events in ${pages + 1} pages, ${expected.length} expected`)
          }
          if (pages > 0) pagedReplays++
          replaysWhole++
        } else {
          const window = (await bus.window(channels)).map((event) => event.id)
          if (await bus.trimmed(channels)) continue
          const expected = expectedOf(channels, 0)
          if (window.join() !== expected.join()) {
            failures++
            t.fail(`step ${step}: window of ${channels.join(' ')} not trimmed: ${window.length} events, ${expected.length} expected`)
          }
          windowsWhole++
        }
      }
    }
    t.equal(failures, 0, `${replaysWhole} replays without reset and ${windowsWhole} untrimmed windows were whole`)
    t.ok(replaysWhole > 100, 'enough replays came without reset to mean something')
    t.ok(windowsWhole >= 10, 'and enough windows without trimmed')
    // Fewer than HISTORY_SIZE=1000 keeps make no page of 256 KB.
    if (cap > 256 * 1024 && historySize === 1000) t.ok(pagedReplays >= 5, `replays of several pages among them (${pagedReplays})`)
  })
}

/**
 * The same under a window of a second or two, on a clock the test moves:
 * events leave by age, records go by the sweep, and slots of the table of
 * marks are taken over once their marks leave the window. A reopen reads
 * its window and asks `trimmed` up to 0.9 s later, with publishes and maybe
 * a sweep between, as a slow open does; a window not `trimmed` then holds every event of its
 * channels from the window's start when it was read.
 */
for (const { historySize, cap, ttlS } of [0, 3, 1000].flatMap((historySize) => [
  { historySize, cap: 64 * 1024, ttlS: 1 },
  { historySize, cap: 1024 * 1024, ttlS: 2 }
])) {
  t.test(`HISTORY_SIZE=${historySize}, a ${cap / 1024} KB cap, a ${ttlS} s window on a moving clock: no replay or window misses an event without saying so`, async (t) => {
    const random = randomFrom(104_729 * (historySize + 1) + cap + ttlS)
    const pick = <T>(items: T[]): T => items[Math.floor(random() * items.length)]
    const realNow = performance.now.bind(performance)
    const start = realNow()
    let elapsedMs = 0
    performance.now = () => start + elapsedMs
    const bus = new MemoryBus({ historySize, historyTtlS: ttlS, maxHistoryBytes: cap })
    t.teardown(async () => {
      performance.now = realNow
      await bus.close()
    })
    const clockId = (): number => Math.floor((performance.timeOrigin + performance.now()) * 1000)
    const hot = ['user:hot', 'topic:hot']
    const warm = Array.from({ length: 300 }, (_, n) => `user:warm${n}`)
    let fresh = 0
    const log: Published[] = []
    const expectedOf = (channels: string[], after: number): number[] =>
      log.filter((event) => event.id > after && channels.some((name) => event.channels.has(name))).map((event) => event.id)
    const publishSome = (): void => {
      const channels = new Set<string>()
      const count = 1 + Math.floor(random() * (random() < 0.1 ? 120 : 4))
      for (let n = 0; n < count; n++) {
        const kind = random()
        channels.add(kind < 0.2 ? pick(hot) : kind < 0.7 ? pick(warm) : `user:new${fresh++}`)
      }
      const body = renderBody('e', 'x'.repeat(random() < 0.05 ? 3000 : Math.floor(random() * 200)))
      const [id] = bus.publishNow([{ channels: [...channels], body }])
      log.push({ id, channels })
    }
    let replaysWhole = 0
    let windowsWhole = 0
    let failures = 0

    for (let step = 0; step < 6000 && failures < 5; step++) {
      // Mostly a few milliseconds a step, now and then most of a window.
      elapsedMs += random() < 0.01 ? random() * ttlS * 1000 : random() * 4
      if (random() < 0.005) bus['sweep']()
      const roll = random()
      if (roll < 0.6) {
        publishSome()
      } else if (log.length > 0) {
        const channels = Array.from({ length: 1 + Math.floor(random() * 3) }, () => {
          const kind = random()
          return kind < 0.1 ? pick(hot) : kind < 0.7 ? pick(warm) : kind < 0.9 ? `user:new${Math.floor(random() * (fresh + 1))}` : `user:none${Math.floor(random() * 1000)}`
        })
        if (roll < 0.85) {
          const after = log[Math.max(0, log.length - 1 - Math.floor(random() ** 3 * 200))].id
          const ids: number[] = []
          let reset = false
          for (let from = after; ;) {
            const page = await bus.replay(channels, from)
            if (page.reset !== null) {
              reset = true
              break
            }
            ids.push(...page.events.map((event) => event.id))
            if (page.more !== true) break
            from = ids[ids.length - 1]
          }
          if (reset) continue
          const expected = expectedOf(channels, after)
          if (ids.join() !== expected.join()) {
            failures++
            t.fail(`step ${step}: replay of ${channels.join(' ')} after ${after} without reset: ${ids.length} events, ${expected.length} expected`)
          }
          replaysWhole++
        } else {
          const windowStart = clockId() - ttlS * 1_000_000
          const window = (await bus.window(channels)).map((event) => event.id)
          const newestRead = log[log.length - 1].id
          // The open's own work before it asks: time, and other publishes.
          elapsedMs += random() * 900
          for (let n = Math.floor(random() * 20); n > 0; n--) publishSome()
          if (random() < 0.5) bus['sweep']()
          if (await bus.trimmed(channels)) continue
          const expected = expectedOf(channels, windowStart - 1).filter((id) => id <= newestRead)
          if (window.join() !== expected.join()) {
            failures++
            t.fail(`step ${step}: window of ${channels.join(' ')} not trimmed: ${window.length} events, ${expected.length} expected`)
          }
          windowsWhole++
        }
      }
    }
    t.equal(failures, 0, `${replaysWhole} replays without reset and ${windowsWhole} untrimmed windows were whole`)
    t.ok(replaysWhole > 100, 'enough replays came without reset to mean something')
    t.ok(windowsWhole >= 10, 'and enough windows without trimmed')
  })
}
