export type StopStep = 'drain' | 'give up' | 'ignore'

/**
 * What each stop signal does: the first starts the drain, a second gives
 * it up (Ctrl-C twice, a supervisor that will not wait), and any signal
 * after that, or once the drain has ended and only its last lines are
 * being written, changes nothing (it would turn a clean exit into a
 * failed one).
 */
export class StopSequence {
  private stage: 'running' | 'draining' | 'over' = 'running'

  next (): StopStep {
    if (this.stage === 'running') {
      this.stage = 'draining'
      return 'drain'
    }
    if (this.stage === 'draining') {
      this.stage = 'over'
      return 'give up'
    }
    return 'ignore'
  }

  /** The drain ended (stopped, timed out or failed). */
  drainOver (): void {
    this.stage = 'over'
  }
}
