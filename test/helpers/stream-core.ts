/**
 * For tests that drive the stream core (src/core/streams.ts) without HTTP:
 * a sink the test drains by hand, and stream events that go nowhere.
 */
import { EventEmitter } from 'node:events'
import type { Sink } from '../../src/core/connection'
import type { TestLike } from './gateway'
import type { StreamEvents } from '../../src/core/streams'

/** A socket that takes every write into its buffer and drains only when told (or at once, with `auto`). */
export class HandDrainedSink extends EventEmitter implements Sink {
  readonly written: Buffer[] = []
  writableLength = 0
  destroyed = false
  /** Closed with a reset (what it held dropped). */
  reset = false
  auto = false

  write (chunk: Buffer): boolean {
    this.written.push(Buffer.from(chunk))
    if (this.auto) {
      setImmediate(() => this.emit('drain'))
      return false
    }
    this.writableLength += chunk.length
    return false
  }

  drain (): void {
    this.writableLength = 0
    this.emit('drain')
  }

  end (): void {}

  destroy (): void {
    this.destroyed = true
    this.emit('close')
  }

  resetAndDestroy (): void {
    this.reset = true
    this.destroy()
  }

  text (): string {
    return Buffer.concat(this.written).toString()
  }

  /** The names of the events sent, in order (each event's data starts with its name). */
  names (): string[] {
    return [...this.text().matchAll(/^id: \d+\nevent: e\ndata: (\S+)/gm)].map((match) => match[1])
  }
}

export const noEvents: StreamEvents = {
  opened () {},
  closed () {},
  replayed () {},
  reset () {},
  catchingUp () {},
  catchUpFailed () {},
  async topicsChanged () {},
  superseded () {},
  cursorsMoved () {}
}

/**
 * Makes performance.now() answer `now(the real reading)` until the test
 * ends; the restore is registered first, so that nothing after can leave
 * the clock faked for the tests that follow.
 */
export function fakePerformanceNow (t: TestLike, now: (real: number) => number): void {
  const real = performance.now.bind(performance)
  t.teardown(() => { performance.now = real })
  performance.now = () => now(real())
}
