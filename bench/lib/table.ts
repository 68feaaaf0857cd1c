/** The results table printed at the end of a run. */
import type { MetricDef, ScenarioResult, TargetRun } from '../scenarios/common'
import type { TargetKind } from './server'

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

function runOf (result: ScenarioResult, kind: TargetKind): TargetRun | null {
  const run = result.runs[kind]
  return run === undefined || 'error' in run ? null : run
}

/** gateway ÷ another target, or null when either side is missing or zero. */
export function ratio (metric: MetricDef, gateway: number | null | undefined, other: number | null | undefined): number | null {
  if (metric.better === null) return null
  if (gateway === null || gateway === undefined || other === null || other === undefined || other <= 0 || gateway < 0) return null
  return gateway / other
}

/** The gateway's figure ÷ another target's for one metric, null where either did not run. */
export function gatewayRatio (result: ScenarioResult, metric: MetricDef, other: TargetKind): number | null {
  return ratio(metric, runOf(result, 'gateway')?.values[metric.key], runOf(result, other)?.values[metric.key])
}

function ratioCell (metric: MetricDef, r: number | null): string {
  if (r === null) return ''
  const better = metric.better === 'higher' ? r >= 1 : r <= 1
  return `${r.toFixed(2)}×${better ? ' ✓' : ''}`
}

function cellOf (result: ScenarioResult, kind: TargetKind, metric: MetricDef): string {
  const run = result.runs[kind]
  if (run === undefined) return 'not run'
  if ('error' in run) return 'error'
  return withUnit(run.values[metric.key], metric.unit)
}

/** One row per metric: each target's figure, the gateway's ratio to the baseline (and to Nchan, where it ran), the target. */
export function renderTable (results: ScenarioResult[]): string {
  const withNchan = results.some((result) => result.runs.nchan !== undefined)
  const kinds: TargetKind[] = withNchan ? ['baseline', 'gateway', 'nchan'] : ['baseline', 'gateway']
  const comparedTo: TargetKind[] = withNchan ? ['baseline', 'nchan'] : ['baseline']
  const header = ['scenario', 'metric', ...kinds, ...comparedTo.map((other) => other === 'baseline' ? 'gw/base' : 'gw/nchan'), 'target']
  const rows: string[][] = [header]
  for (const result of results) {
    let first = true
    for (const metric of result.metrics) {
      const values = kinds.map((kind) => runOf(result, kind)?.values[metric.key])
      if (values.every((value) => value === undefined || value === null)) continue
      const ratios = comparedTo.map((other) => ratioCell(metric, gatewayRatio(result, metric, other)))
      rows.push([first ? result.id.toUpperCase() : '', metric.label, ...kinds.map((kind) => cellOf(result, kind, metric)), ...ratios, metric.target ?? ''])
      first = false
    }
    if (first) rows.push([result.id.toUpperCase(), '(no figures)', ...kinds.map((kind) => errorOf(result, kind)), ...comparedTo.map(() => ''), ''])
  }
  const numeric = (column: number): boolean => column >= 2 && column < header.length - 1
  const widths = header.map((_, column) => Math.max(...rows.map((row) => [...row[column]].length)))
  const line = (row: string[]): string => row.map((cell, column) => numeric(column) ? cell.padStart(widths[column]) : cell.padEnd(widths[column])).join('  ')
  const out = [line(header), widths.map((width) => '-'.repeat(width)).join('  ')]
  for (const row of rows.slice(1)) out.push(line(row))
  return out.join('\n')
}

function errorOf (result: ScenarioResult, kind: TargetKind): string {
  const run = result.runs[kind]
  if (run === undefined) return 'not run'
  return 'error' in run ? 'error' : ''
}
