/**
 * Preloaded into servers under test (`node --expose-gc -r dist/bench/lib/gc-on-signal.js`):
 * SIGUSR2 runs a full garbage collection, so memory is read without the garbage
 * that happens to be uncollected at that moment. It changes nothing else.
 */
const collect = (globalThis as { gc?: () => void }).gc
if (typeof collect === 'function') {
  process.on('SIGUSR2', () => collect())
}
