/** Readers of /proc (Linux): memory, CPU time, descriptors, limits, machine. */
import { execFileSync } from 'node:child_process'
import { readdirSync, readFileSync } from 'node:fs'
import { cpus, totalmem } from 'node:os'

function readText (path: string): string | null {
  try {
    return readFileSync(path, 'utf8')
  } catch {
    return null
  }
}

/** VmRSS of a process in KiB, or null when it cannot be read (not Linux, process gone). */
export function rssKb (pid: number): number | null {
  const status = readText(`/proc/${pid}/status`)
  const match = status === null ? null : /^VmRSS:\s+(\d+)\s+kB/m.exec(status)
  return match === null ? null : Number(match[1])
}

let clockTicks: number | null = null
function ticksPerSecond (): number {
  if (clockTicks === null) {
    try {
      clockTicks = Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim()) || 100
    } catch {
      clockTicks = 100
    }
  }
  return clockTicks
}

/** User + system CPU seconds a process (all its threads) has used, or null. */
export function cpuSeconds (pid: number): number | null {
  const stat = readText(`/proc/${pid}/stat`)
  if (stat === null) return null
  // The command name may hold spaces; fields are counted after its closing parenthesis.
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
  const utime = Number(fields[11])
  const stime = Number(fields[12])
  return (utime + stime) / ticksPerSecond()
}

/** Processes whose parent is `pid` (nginx's workers under its master), in pid order. */
export function childPids (pid: number): number[] {
  const children: number[] = []
  let entries: string[]
  try {
    entries = readdirSync('/proc')
  } catch {
    return children
  }
  for (const entry of entries) {
    if (!/^\d+$/.test(entry)) continue
    const stat = readText(`/proc/${entry}/stat`)
    if (stat === null) continue
    const parent = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1])
    if (parent === pid) children.push(Number(entry))
  }
  return children.sort((a, b) => a - b)
}

/** Open file descriptors of a process (sockets included), or null. */
export function fdCount (pid: number): number | null {
  try {
    return readdirSync(`/proc/${pid}/fd`).length
  } catch {
    return null
  }
}

export interface FileLimit {
  soft: number
  hard: number
}

/** RLIMIT_NOFILE of a process ('self' by default). */
export function fileLimit (pid: number | 'self' = 'self'): FileLimit | null {
  const limits = readText(`/proc/${pid}/limits`)
  const match = limits === null ? null : /^Max open files\s+(\S+)\s+(\S+)/m.exec(limits)
  if (match === null) return null
  const parse = (value: string): number => value === 'unlimited' ? Number.MAX_SAFE_INTEGER : Number(value)
  return { soft: parse(match[1]), hard: parse(match[2]) }
}

export interface Machine {
  nproc: number
  cpuModel: string
  cpuMHz: number | null
  memTotalMiB: number
  kernel: string
  node: string
  loadAverage: string | null
  portRange: string | null
  tcpTwReuse: string | null
}

export function machine (): Machine {
  const info = readText('/proc/cpuinfo') ?? ''
  const model = /^model name\s*:\s*(.+)$/m.exec(info)?.[1] ?? cpus()[0]?.model ?? 'unknown'
  const mhz = /^cpu MHz\s*:\s*([\d.]+)$/m.exec(info)?.[1]
  return {
    nproc: cpus().length,
    cpuModel: model.trim(),
    cpuMHz: mhz === undefined ? null : Math.round(Number(mhz)),
    memTotalMiB: Math.round(totalmem() / 1048576),
    kernel: readText('/proc/sys/kernel/osrelease')?.trim() ?? process.platform,
    node: process.version,
    loadAverage: readText('/proc/loadavg')?.split(' ').slice(0, 3).join(' ') ?? null,
    portRange: readText('/proc/sys/net/ipv4/ip_local_port_range')?.trim().replace(/\s+/, '-') ?? null,
    tcpTwReuse: readText('/proc/sys/net/ipv4/tcp_tw_reuse')?.trim() ?? null
  }
}

let tasksetPath: string | null | undefined
/** Whether `taskset` can pin processes here (Linux with util-linux). */
export function hasTaskset (): boolean {
  if (tasksetPath === undefined) {
    try {
      execFileSync('taskset', ['-p', String(process.pid)], { stdio: 'ignore' })
      tasksetPath = 'taskset'
    } catch {
      tasksetPath = null
    }
  }
  return tasksetPath !== null
}

/** Pins every thread of this process (and threads it starts later) to the given CPUs. */
export function pinSelf (cpuList: string): boolean {
  if (!hasTaskset()) return false
  try {
    execFileSync('taskset', ['-a', '-p', '-c', cpuList, String(process.pid)], { stdio: 'ignore' })
    return true
  } catch {
    return false
  }
}

export interface CpuTimes {
  /** Per CPU: [busy ticks, softirq+irq ticks, total ticks]. */
  perCpu: Map<number, [number, number, number]>
}

/** Per-CPU times from /proc/stat (softirq included: loopback TCP work is charged there, not to a process). */
export function cpuTimes (): CpuTimes | null {
  const stat = readText('/proc/stat')
  if (stat === null) return null
  const perCpu = new Map<number, [number, number, number]>()
  for (const line of stat.split('\n')) {
    const match = /^cpu(\d+)\s+(.*)$/.exec(line)
    if (match === null) continue
    const [user, nice, system, idle, iowait, irq, softirq, steal] = match[2].split(/\s+/).map(Number)
    const total = user + nice + system + idle + iowait + irq + softirq + (steal ?? 0)
    perCpu.set(Number(match[1]), [total - idle - iowait, irq + softirq, total])
  }
  return { perCpu }
}

/** Busy % and interrupt (softirq + irq) % of each CPU between two readings. */
export function cpuBusy (before: CpuTimes | null, after: CpuTimes | null): Record<string, { busyPct: number, irqPct: number }> {
  const out: Record<string, { busyPct: number, irqPct: number }> = {}
  if (before === null || after === null) return out
  for (const [cpu, [busy1, irq1, total1]] of after.perCpu) {
    const previous = before.perCpu.get(cpu)
    if (previous === undefined) continue
    const total = total1 - previous[2]
    if (total <= 0) continue
    out[String(cpu)] = { busyPct: ((busy1 - previous[0]) / total) * 100, irqPct: ((irq1 - previous[1]) / total) * 100 }
  }
  return out
}
