/**
 * Runs `work` on every item, in the list's order, at most `concurrency` at
 * once: a bounded number of round trips in flight, however long the list.
 * Rejects with the first failure once those running have settled; no item
 * starts after it.
 */
export async function inTurns<T> (items: readonly T[], concurrency: number, work: (item: T) => Promise<void>): Promise<void> {
  let next = 0
  const failures: unknown[] = []
  const worker = async (): Promise<void> => {
    while (next < items.length && failures.length === 0) {
      const item = items[next++]
      await work(item).catch((error: unknown) => { failures.push(error) })
    }
  }
  await Promise.all(Array.from({ length: Math.min(concurrency, items.length) }, worker))
  if (failures.length > 0) throw failures[0]
}

/**
 * Runs the work given for one key after the work given before it for that
 * key, each once the previous settled: one at a time per key, any number
 * of keys at once. A key with nothing pending is forgotten.
 */
export class TurnsPerKey {
  private readonly keys = new Map<string, { tail: Promise<void>, count: number }>()

  async run<T> (key: string, work: () => Promise<T>): Promise<T> {
    const before = this.keys.get(key)
    const result = before === undefined ? work() : before.tail.then(work)
    const tail = result.then(() => {}, () => {})
    const entry = { tail, count: (before?.count ?? 0) + 1 }
    this.keys.set(key, entry)
    void tail.then(() => {
      const now = this.keys.get(key)
      if (now === undefined) return
      now.count--
      if (now.tail === tail) this.keys.delete(key)
    })
    return await result
  }

  /** Work given for `key` and not yet settled. */
  pending (key: string): number {
    return this.keys.get(key)?.count ?? 0
  }

  /** Keys with work pending. */
  get size (): number {
    return this.keys.size
  }
}
