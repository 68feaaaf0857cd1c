/**
 * Stop signals that arrive while the gateway's modules load. Node as PID 1
 * (a container's exec-form CMD, with no init) ignores a signal it has no
 * handler for: a stop sent in the first fraction of a second was lost, and
 * the orchestrator waited out its grace period for SIGKILL. The server
 * imports this module before any other. (Before Node runs it, some tens of
 * milliseconds after the exec, only an init can keep a signal.)
 */
let received: NodeJS.Signals | null = null
const hold = (signal: NodeJS.Signals): void => { received ??= signal }
process.on('SIGTERM', hold)
process.on('SIGINT', hold)

/** Hands SIGTERM and SIGINT to `handler` from now on, after the one that came before, if any. */
export function takeStopSignals (handler: (signal: NodeJS.Signals) => void): void {
  // Added before the holder goes: a signal with no listener left stops
  // Node's watcher, and one that arrived while the modules loaded, not yet
  // handed to a listener (that happens on the next turn of the event
  // loop), would be lost with it. So such a signal reaches `handler`.
  process.on('SIGTERM', handler)
  process.on('SIGINT', handler)
  process.off('SIGTERM', hold)
  process.off('SIGINT', hold)
  // Only if the event loop turned before this call (a start that awaited
  // something first), the holder has it.
  if (received !== null) handler(received)
}
