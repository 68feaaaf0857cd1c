/** The results table printed at the end of a run. */
import type { MetricDef, ScenarioResult, TargetRun } from '../scenarios/common'

export function formatNumber (value: number | null | undefined): string {
  if (value === null || value === undefined || !Number.isFinite(value)) return '—'
  const abs = Math.abs(value)
  if (abs >= 1e6) return `${(value / 1e6).toFixed(2)} M`
  if (abs >= 1e4) return `${(value / 1e3).toFixed(1)} k`
  if (abs >= 100 || Number.isInteger(value)) return value.toFixed(0)
  if (abs >= 10) return value.toFixed(1)
  return value.toFixed(2)
}

function withUnit (value: number | null | undefined, unit: string): string {
  const text = formatNumber(value)
  return text === '—' || unit === '' ? text : `${text} ${unit}`
}

function runOf (result: ScenarioResult, kind: 'gateway' | 'baseline'): TargetRun | null {
  const run = result.runs[kind]
  return run === undefined || 'error' in run ? null : run
}

/** gateway ÷ baseline, or null when either side is missing or zero. */
export function ratio (metric: MetricDef, gateway: number | null | undefined, baseline: number | null | undefined): number | null {
  if (metric.better === null) return null
  if (gateway === null || gateway === undefined || baseline === null || baseline === undefined || baseline <= 0 || gateway < 0) return null
  return gateway / baseline
}

export function renderTable (results: ScenarioResult[]): string {
  const rows: string[][] = [['scenario', 'metric', 'baseline', 'gateway', 'gw/base', 'issue 7 target']]
  for (const result of results) {
    const gateway = runOf(result, 'gateway')
    const baseline = runOf(result, 'baseline')
    let first = true
    for (const metric of result.metrics) {
      const g = gateway?.values[metric.key]
      const b = baseline?.values[metric.key]
      if ((g === undefined || g === null) && (b === undefined || b === null)) continue
      const r = ratio(metric, g, b)
      const mark = r === null ? '' : metric.better === 'higher' ? (r >= 1 ? ' ✓' : '') : (r <= 1 ? ' ✓' : '')
      rows.push([
        first ? result.id.toUpperCase() : '',
        metric.label,
        result.runs.baseline === undefined ? 'not run' : baseline === null ? 'error' : withUnit(b, metric.unit),
        result.runs.gateway === undefined ? 'not run' : gateway === null ? 'error' : withUnit(g, metric.unit),
        r === null ? '' : `${r.toFixed(2)}×${mark}`,
        metric.target ?? ''
      ])
      first = false
    }
    if (first) rows.push([result.id.toUpperCase(), '(no figures)', errorOf(result, 'baseline'), errorOf(result, 'gateway'), '', ''])
  }
  const widths = rows[0].map((_, column) => Math.max(...rows.map((row) => [...row[column]].length)))
  const line = (row: string[]): string => row.map((cell, column) => column >= 2 && column <= 4 ? cell.padStart(widths[column]) : cell.padEnd(widths[column])).join('  ')
  const out = [line(rows[0]), widths.map((width) => '-'.repeat(width)).join('  ')]
  for (const row of rows.slice(1)) out.push(line(row))
  return out.join('\n')
}

function errorOf (result: ScenarioResult, kind: 'gateway' | 'baseline'): string {
  const run = result.runs[kind]
  if (run === undefined) return 'not run'
  return 'error' in run ? 'error' : ''
}
