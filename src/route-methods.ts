/**
 * The methods each route path is served with, to answer a known path asked
 * with another method 405 and `Allow`, where Fastify's router sees only "not
 * found". Patterns are Fastify's: `:param` is one segment, which its router
 * lets be empty at the end of a path; paths are matched decoded, as it does.
 */
interface RoutePath {
  pattern: RegExp
  methods: Set<string>
  /** Served only on the internal listener when INTERNAL_PORT is set. */
  internal: boolean
  /** No parameter: the router prefers it, for its methods, to a parametric path that also matches. */
  exact: boolean
}

export class RouteMethods {
  private readonly paths = new Map<string, RoutePath>()

  add (url: string, methods: string | string[], internal: boolean): void {
    // A catch-all (CORS's preflight route) says nothing about which paths exist.
    if (url.startsWith('*') || url.startsWith('/*')) return
    const key = `${url}\n${String(internal)}`
    let path = this.paths.get(key)
    if (path === undefined) {
      path = { pattern: patternOf(url), methods: new Set(), internal, exact: !url.includes(':') }
      this.paths.set(key, path)
    }
    for (const method of Array.isArray(methods) ? methods : [methods]) path.methods.add(method.toUpperCase())
  }

  /**
   * The methods to name in `Allow` for `method` on `path`, or null when the
   * answer is 404: the path is unknown, or served with `method` (by a route
   * hidden on this listener), or with none visible here.
   */
  allowed (rawPath: string, method: string, internalHidden: boolean): string[] | null {
    const path = decoded(rawPath)
    let matching = [...this.paths.values()].filter((candidate) => candidate.pattern.test(path))
    // A path with a route of its own names that route's resource, not a
    // parameter's value (`/v1/jobs/stream` is no job): a parametric route's
    // methods are not its.
    if (matching.some((candidate) => candidate.exact)) matching = matching.filter((candidate) => candidate.exact)
    const allowed = new Set<string>()
    for (const candidate of matching) {
      // A path with routes that exist only on the other listener answers 404
      // to every method not served here: a 405 for some methods and a 404 for
      // the hidden ones would tell which those are.
      if (candidate.internal && internalHidden) return null
      if (candidate.methods.has(method)) return null
      for (const each of candidate.methods) allowed.add(each)
    }
    return allowed.size === 0 ? null : [...allowed].sort()
  }

  /**
   * Whether `rawPath`, which the router matched to the parametric route
   * `routeUrl`, is the path of a route of its own, so names that route's
   * resource and not a parameter's value (`HEAD /v1/jobs/stream` is no job).
   */
  shadowedByExact (rawPath: string, routeUrl: string | undefined): boolean {
    if (routeUrl === undefined || !routeUrl.includes(':')) return false
    const path = decoded(rawPath)
    for (const candidate of this.paths.values()) if (candidate.exact && candidate.pattern.test(path)) return true
    return false
  }

  /** Whether a route visible on this listener serves `rawPath`, with `method` or, without it, with any. */
  serves (rawPath: string, internalHidden: boolean, method?: string): boolean {
    const path = decoded(rawPath)
    for (const candidate of this.paths.values()) {
      if ((method === undefined || candidate.methods.has(method)) && candidate.pattern.test(path) && !(candidate.internal && internalHidden)) return true
    }
    return false
  }
}

function patternOf (url: string): RegExp {
  const segments = url.split('/').map((segment) => segment.startsWith(':') ? '[^/]*' : segment.replace(/[.*+?^${}()|[\]\\]/g, '\\$&'))
  return new RegExp(`^${segments.join('/')}$`)
}

function decoded (path: string): string {
  try {
    return decodeURIComponent(path)
  } catch {
    return path
  }
}
