/** Where a repeated warning is written (the app's pino logger). Not in the Redis engine's module: embedded mode never loads ioredis. */
export interface WarningLog {
  warn: (obj: object, msg: string) => void
}

/**
 * A warning that repeats for as long as a fault lasts (each reconnect
 * attempt of each connection, each beat): written the first time, then at
 * most once a minute, with how many were held back meanwhile, and at once
 * again after `clear()` (the fault ended). The end of a fault that was
 * written is a line too, with how long it lasted and how many repeats were
 * held back since the last warning: an outage shorter than a minute would
 * otherwise say nothing past its first line.
 */
export class RepeatedWarning {
  private startedAt: number | null = null
  private writtenAt: number | null = null
  private heldBack = 0

  constructor (private readonly log: WarningLog, private readonly message: string, private readonly fields: Record<string, unknown> = {}, private readonly everyMs = 60_000) {}

  warn (fields: Record<string, unknown>): void {
    const now = Date.now()
    this.startedAt ??= now
    if (this.writtenAt !== null && now - this.writtenAt < this.everyMs) {
      this.heldBack++
      return
    }
    this.log.warn({ ...this.fields, ...fields, ...(this.heldBack > 0 ? { heldBack: this.heldBack } : {}) }, this.message)
    this.writtenAt = now
    this.heldBack = 0
  }

  clear (): void {
    if (this.writtenAt !== null && this.startedAt !== null) {
      // At the level of the warning it ends: a log kept at warn sees both.
      this.log.warn({ ...this.fields, lastedMs: Date.now() - this.startedAt, heldBack: this.heldBack }, `${this.message}: over`)
    }
    this.startedAt = null
    this.writtenAt = null
    this.heldBack = 0
  }
}
