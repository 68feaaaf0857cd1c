/** Small HTTP helpers for control requests (not the measured traffic). */
import { request } from 'node:http'

export interface HttpAnswer {
  status: number
  body: string
}

export function httpRequest (url: string, options: { method?: string, headers?: Record<string, string>, body?: string, timeoutMs?: number } = {}): Promise<HttpAnswer> {
  return new Promise((resolve, reject) => {
    const req = request(url, { method: options.method ?? 'GET', headers: options.headers, agent: false }, (res) => {
      const chunks: Buffer[] = []
      res.on('data', (chunk: Buffer) => chunks.push(chunk))
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks).toString('utf8') }))
      res.on('error', reject)
    })
    req.setTimeout(options.timeoutMs ?? 5000, () => req.destroy(new Error(`timeout: ${options.method ?? 'GET'} ${url}`)))
    req.on('error', reject)
    req.end(options.body)
  })
}

/** Prometheus text → metric name → value summed over its label sets. */
export function parsePrometheus (text: string): Map<string, number> {
  const values = new Map<string, number>()
  for (const line of text.split('\n')) {
    if (line === '' || line.startsWith('#')) continue
    const match = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)/.exec(line)
    if (match === null) continue
    const value = Number(match[3])
    if (!Number.isFinite(value)) continue
    values.set(match[1], (values.get(match[1]) ?? 0) + value)
  }
  return values
}
