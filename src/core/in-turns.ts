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
  private readonly tails = new Map<string, Promise<void>>()

  async run<T> (key: string, work: () => Promise<T>): Promise<T> {
    const before = this.tails.get(key)
    const result = before === undefined ? work() : before.then(work)
    const tail = result.then(() => {}, () => {})
    this.tails.set(key, tail)
    void tail.then(() => {
      if (this.tails.get(key) === tail) this.tails.delete(key)
    })
    return await result
  }

  /** Keys with work pending. */
  get size (): number {
    return this.tails.size
  }
}
