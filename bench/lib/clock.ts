/**
 * One clock for every thread of the bench process: the monotonic clock
 * (CLOCK_MONOTONIC, shared by all threads and processes of the machine) in
 * microseconds, shifted by an offset taken once in the main thread so values
 * read like epoch microseconds (what `sseload` also understands as `"t"`).
 */

export function monotonicUs (): number {
  return Number(process.hrtime.bigint() / 1000n)
}

/** Taken once in the main thread and handed to workers. */
export function epochOffsetUs (): number {
  return Date.now() * 1000 - monotonicUs()
}

export type Clock = () => number

export function clockWith (offsetUs: number): Clock {
  return () => monotonicUs() + offsetUs
}

export function sleep (ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms))
}
