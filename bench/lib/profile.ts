/** Summarises a V8 .cpuprofile (from `node --cpu-prof`): self time per function. */
import { readFileSync } from 'node:fs'
import { relative } from 'node:path'

interface ProfileNode {
  id: number
  callFrame: { functionName: string, url: string, lineNumber: number }
  children?: number[]
}

interface CpuProfile {
  nodes: ProfileNode[]
  samples: number[]
  timeDeltas: number[]
  startTime: number
  endTime: number
}

export interface ProfileLine {
  selfMs: number
  pct: number
  name: string
}

function where (url: string, line: number, root: string): string {
  if (url === '') return ''
  const path = url.startsWith('file://') ? url.slice(7) : url
  const shown = path.startsWith('node:') ? path : relative(root, path).replace(/^.*node_modules\//, '')
  return `${shown}:${line + 1}`
}

/** Self time per function, as % of the busy (non-idle) time. */
export function summariseProfile (file: string, root: string, top = 25): { totalMs: number, idleMs: number, lines: ProfileLine[] } {
  const profile = JSON.parse(readFileSync(file, 'utf8')) as CpuProfile
  const byId = new Map<number, ProfileNode>()
  for (const node of profile.nodes) byId.set(node.id, node)
  const self = new Map<string, number>()
  let total = 0
  for (let index = 0; index < profile.samples.length; index++) {
    const node = byId.get(profile.samples[index])
    const delta = profile.timeDeltas[index] ?? 0
    if (node === undefined) continue
    const { functionName, url, lineNumber } = node.callFrame
    const key = `${functionName === '' ? '(anonymous)' : functionName} ${where(url, lineNumber, root)}`.trim()
    self.set(key, (self.get(key) ?? 0) + delta)
    total += delta
  }
  const idle = self.get('(idle)') ?? 0
  self.delete('(idle)')
  const busy = total - idle
  const lines = [...self.entries()]
    .sort((a, b) => b[1] - a[1])
    .slice(0, top)
    .map(([name, us]) => ({ selfMs: us / 1000, pct: busy === 0 ? 0 : (us / busy) * 100, name }))
  return { totalMs: total / 1000, idleMs: idle / 1000, lines }
}

export function renderProfile (file: string, root: string, top = 25): string {
  const { totalMs, idleMs, lines } = summariseProfile(file, root, top)
  const out = [`${relative(root, file)}: ${(totalMs / 1000).toFixed(1)} s sampled, ${((totalMs - idleMs) / 1000).toFixed(1)} s not idle; top ${lines.length} by self time (% of not idle)`]
  for (const line of lines) out.push(`  ${line.pct.toFixed(1).padStart(5)} %  ${line.selfMs.toFixed(0).padStart(7)} ms  ${line.name}`)
  return out.join('\n')
}
