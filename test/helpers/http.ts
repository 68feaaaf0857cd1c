/** JSON requests through fetch (Node 20's undici). */

export interface JsonResponse<T = unknown> {
  status: number
  headers: Headers
  /** The parsed body, or undefined when it is not JSON. */
  json: T
  text: string
}

export interface RequestOptions {
  method?: string
  token?: string
  headers?: Record<string, string>
  /** An object is sent as JSON; a string is sent as it is (with a JSON content type). */
  body?: unknown
  /** How long to wait for the whole answer; 15 s unless told. */
  timeoutMs?: number
}

export async function request<T = unknown> (url: string, options: RequestOptions = {}): Promise<JsonResponse<T>> {
  const headers: Record<string, string> = { ...options.headers }
  if (options.token !== undefined) headers.authorization = `Bearer ${options.token}`
  let body: string | undefined
  if (options.body !== undefined) {
    headers['content-type'] ??= 'application/json'
    body = typeof options.body === 'string' ? options.body : JSON.stringify(options.body)
  }
  const response = await fetch(url, {
    method: options.method ?? (body === undefined ? 'GET' : 'POST'),
    headers,
    body,
    signal: AbortSignal.timeout(options.timeoutMs ?? 15_000)
  })
  const text = await response.text()
  let json: unknown
  try {
    json = JSON.parse(text)
  } catch {
    json = undefined
  }
  return { status: response.status, headers: response.headers, json: json as T, text }
}

export interface PublishAnswer {
  id?: string
  ids?: string[]
  statusCode?: number
  error?: string
  message?: string
}

/** POST /v1/publish with a Bearer token; a string body is sent unparsed. */
export async function publish (url: string, token: string, body: unknown, options: { timeoutMs?: number } = {}): Promise<{ status: number, json: PublishAnswer }> {
  const { status, json } = await request<PublishAnswer>(`${url}/v1/publish`, { method: 'POST', token, body, timeoutMs: options.timeoutMs })
  return { status, json }
}

/** Publishes and insists on 202; returns the ids in order. */
export async function publishOk (url: string, token: string, body: unknown, options: { timeoutMs?: number } = {}): Promise<string[]> {
  const { status, json } = await publish(url, token, body, options)
  if (status !== 202) throw new Error(`publish answered ${status}: ${JSON.stringify(json)}`)
  if (json.ids !== undefined) return json.ids
  if (json.id !== undefined) return [json.id]
  throw new Error(`publish answered 202 without ids: ${JSON.stringify(json)}`)
}
