/**
 * Waiting on a condition that changes when data arrives: the clients call
 * `wake()` on every arrival, and `until` re-checks then, with a bounded timeout.
 */
export class Waiters {
  private readonly waiting = new Set<() => void>()

  /** Re-checks every pending condition. */
  wake (): void {
    for (const waiter of [...this.waiting]) waiter()
  }

  /**
   * Resolves once `check` holds. Rejects after `timeoutMs` or once `gaveUp`
   * says no more data can come; `describe` adds the client's state to the error.
   */
  async until (check: () => boolean, options: { timeoutMs: number, what: string, describe: () => string, gaveUp?: () => string | null }): Promise<void> {
    if (check()) return
    await new Promise<void>((resolve, reject) => {
      const done = (): void => {
        clearTimeout(timer)
        this.waiting.delete(wake)
      }
      const wake = (): void => {
        if (check()) {
          done()
          resolve()
          return
        }
        const reason = options.gaveUp?.() ?? null
        if (reason !== null) {
          done()
          reject(new Error(`${reason} before ${options.what} (${options.describe()})`))
        }
      }
      const timer = setTimeout(() => {
        done()
        reject(new Error(`timed out after ${options.timeoutMs} ms waiting for ${options.what} (${options.describe()})`))
      }, options.timeoutMs)
      this.waiting.add(wake)
      wake()
    })
  }
}

/** Races `promise` against a timer, so no wait is unbounded. */
export async function within<T> (promise: Promise<T>, timeoutMs: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined
  const timeout = new Promise<never>((_resolve, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${timeoutMs} ms waiting for ${what}`)), timeoutMs)
  })
  try {
    return await Promise.race([promise, timeout])
  } finally {
    clearTimeout(timer)
  }
}
