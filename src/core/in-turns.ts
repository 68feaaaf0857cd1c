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
