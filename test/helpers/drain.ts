/** Holding a gateway's internals at a chosen point while it starts to drain. */
import type { Test } from 'tap'
import { eventually, type Gateway } from './gateway'
import { openStream, type SseClient } from './sse'
import { userToken } from './tokens'

/**
 * Holds calls to `target[method]` at a gate: `entered` resolves with the first
 * call's arguments when it arrives, and every call waits for `open()` before
 * running the real one. Calls `holds` turns down pass straight through (others'
 * calls: on a shared Redis, ingress from other tests reaches every holder).
 */
export function gate<T extends object, K extends keyof T> (target: T, method: K, holds: (args: unknown[]) => boolean = () => true): { entered: Promise<unknown[]>, open: () => void } {
  const real = (target[method] as (...args: unknown[]) => Promise<unknown>).bind(target)
  let signalEntered = (_args: unknown[]): void => {}
  const entered = new Promise<unknown[]>((resolve) => { signalEntered = resolve })
  let release = (): void => {}
  const opened = new Promise<void>((resolve) => { release = resolve })
  target[method] = (async (...args: unknown[]) => {
    if (!holds(args)) return await real(...args)
    signalEntered(args)
    await opened
    return await real(...args)
  }) as T[K]
  return { entered, open: release }
}

/**
 * Starts the drain as SIGTERM does (app.close()) and waits until it has begun;
 * `closed` settles when the close has finished. (Wrapped: an async function
 * returning the promise itself would wait for it.)
 */
export async function beginDrain (t: Test, app: { close: () => Promise<unknown>, streams: { isDraining: boolean } }): Promise<{ closed: Promise<unknown> }> {
  const closed = app.close()
  await eventually(() => app.streams.isDraining, 'the drain to begin')
  t.pass('draining')
  return { closed }
}

/**
 * A stream of `user` held at its admission while `gateway` begins to drain,
 * then let go: the answer it gets (a 503), and the close under way.
 */
export async function openAdmittedAsDrainBegins (t: Test, gateway: Gateway, user: string): Promise<{ answer: SseClient, closed: Promise<unknown> }> {
  const admission = gate(gateway.app.state, 'admit')
  // A reset would reject: kept as a value, so the test fails on it, not the process.
  const opening = openStream(`${gateway.url}/v1/stream?token=${userToken(user)}`, { t }).catch((error: Error) => error)
  await admission.entered
  const { closed } = await beginDrain(t, gateway.app)
  admission.open()
  const answer = await opening
  if (answer instanceof Error) throw new Error(`the open was not answered: ${answer.message}`)
  return { answer, closed }
}
