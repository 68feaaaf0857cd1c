import { readFileSync } from 'node:fs'

/**
 * Descriptors kept out of the streams' reach: the listeners, Redis's
 * connections, the log, and the connections of publishers, probes and
 * dashboards. Streams that took every one left the process unable to
 * reconnect to Redis or answer its health probe (EMFILE), which an
 * orchestrator answers with a restart: every stream lost.
 */
export const DESCRIPTORS_KEPT = 256

/** This process's limit, once read: the streams' cap and the connection reserve both derive from it. */
let ownLimit: number | null | undefined

/**
 * The process's open-file limit as Linux reports it (Node raises the soft
 * limit to the hard one at start), or null where it cannot be read; of
 * `limitsText` when given.
 */
export function openFileLimit (limitsText?: string): number | null {
  if (limitsText !== undefined) return limitOf(limitsText)
  if (ownLimit === undefined) {
    try {
      ownLimit = limitOf(readFileSync('/proc/self/limits', 'utf8'))
    } catch {
      ownLimit = null
    }
  }
  return ownLimit
}

function limitOf (limitsText: string): number | null {
  const match = /^Max open files\s+(\d+|unlimited)\s/m.exec(limitsText)
  if (match === null || match[1] === 'unlimited') return null
  return Number(match[1])
}

/** The most streams the process holds: MAX_CONNECTIONS, or fewer where the open-file limit needs it. */
export function streamCapacity (maxConnections: number, fileLimit: number | null): number {
  if (fileLimit === null) return maxConnections
  return Math.max(1, Math.min(maxConnections, fileLimit - DESCRIPTORS_KEPT))
}
