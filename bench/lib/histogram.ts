/**
 * A log-linear histogram of non-negative integers (microseconds here): exact
 * below 128, then 64 sub-buckets per power of two (at most 1.6 % error). One
 * fixed-size array, O(1) per sample, cheap to merge across worker threads.
 */

const SUB_BITS = 6
const SUB = 1 << SUB_BITS
/** Largest recordable value: 2^31 - 1 µs (about 36 minutes); larger values are clamped. */
const MAX_VALUE = 0x7fffffff
const BUCKETS = (31 - SUB_BITS) * SUB + 2 * SUB

export function bucketOf (value: number): number {
  const v = value <= 0 ? 0 : value >= MAX_VALUE ? MAX_VALUE : Math.floor(value)
  if (v < 2 * SUB) return v
  const shift = 31 - Math.clz32(v) - SUB_BITS
  return shift * SUB + (v >>> shift)
}

/** The middle of a bucket's range, as the value reported for samples in it. */
export function valueOf (bucket: number): number {
  if (bucket < 2 * SUB) return bucket
  const shift = Math.floor(bucket / SUB) - 1
  const mantissa = bucket - shift * SUB
  const low = mantissa * 2 ** shift
  return low + (2 ** shift - 1) / 2
}

export class Histogram {
  readonly counts: Float64Array
  count = 0
  sum = 0
  max = 0

  constructor (counts?: ArrayLike<number>) {
    this.counts = new Float64Array(BUCKETS)
    if (counts !== undefined) this.add(counts)
  }

  record (value: number): void {
    this.counts[bucketOf(value)]++
    this.count++
    this.sum += value
    if (value > this.max) this.max = value
  }

  /** Adds raw bucket counts (from a worker) into this histogram. */
  add (counts: ArrayLike<number>, sum = 0, max = 0): void {
    for (let index = 0; index < counts.length && index < BUCKETS; index++) {
      const n = counts[index]
      if (n === 0) continue
      this.counts[index] += n
      this.count += n
    }
    this.sum += sum
    if (max > this.max) this.max = max
  }

  merge (other: Histogram): void {
    this.add(other.counts, other.sum, other.max)
  }

  /** The value at quantile q (0..1), or null without samples. */
  quantile (q: number): number | null {
    if (this.count === 0) return null
    const rank = Math.max(1, Math.ceil(q * this.count))
    let seen = 0
    for (let index = 0; index < BUCKETS; index++) {
      seen += this.counts[index]
      if (seen >= rank) return Math.min(valueOf(index), this.max)
    }
    return this.max
  }

  mean (): number | null {
    return this.count === 0 ? null : this.sum / this.count
  }

  reset (): void {
    this.counts.fill(0)
    this.count = 0
    this.sum = 0
    this.max = 0
  }

  /** Plain data for postMessage and JSON: only non-empty buckets. */
  toJSON (): SerializedHistogram {
    const buckets: Array<[number, number]> = []
    for (let index = 0; index < BUCKETS; index++) {
      if (this.counts[index] !== 0) buckets.push([index, this.counts[index]])
    }
    return { count: this.count, sum: this.sum, max: this.max, buckets }
  }

  static from (data: SerializedHistogram): Histogram {
    const histogram = new Histogram()
    for (const [index, n] of data.buckets) histogram.counts[index] += n
    histogram.count = data.count
    histogram.sum = data.sum
    histogram.max = data.max
    return histogram
  }
}

export interface SerializedHistogram {
  count: number
  sum: number
  max: number
  buckets: Array<[number, number]>
}
