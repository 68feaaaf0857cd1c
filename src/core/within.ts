/**
 * `work`'s outcome, or `late()`'s when `ms` pass first. The timer is cleared
 * either way: left running, it would hold a stopping process open for its
 * whole length. A rejection of `work` after the time is up is handled (the
 * race listens to it) and dropped.
 */
export async function within<T> (work: Promise<T>, ms: number, late: () => T): Promise<T> {
  let timer: NodeJS.Timeout | undefined
  const timeUp = new Promise<T>((resolve, reject) => {
    timer = setTimeout(() => {
      try {
        resolve(late())
      } catch (error) {
        reject(error)
      }
    }, Math.max(0, ms))
  })
  try {
    return await Promise.race([work, timeUp])
  } finally {
    clearTimeout(timer)
  }
}
