/**
 * within(): the work's outcome, or the fallback's when the time is up, and
 * no timer left behind either way (a stopping process would wait on it).
 */
import t from 'tap'
import { within } from '../src/core/within'

const timers = (): number => process.getActiveResourcesInfo().filter((kind) => kind === 'Timeout').length

t.test('work that settles in time gives its value or its rejection, and the timer is cleared', async (t) => {
  const before = timers()
  t.equal(await within(Promise.resolve('done'), 60_000, () => 'late'), 'done')
  await t.rejects(within(Promise.reject(new Error('failed')), 60_000, () => 'late'), { message: 'failed' })
  t.equal(timers(), before, 'no timer left running')
})

t.test('work that does not settle in time gives the fallback\'s value, or its error when it throws', async (t) => {
  const never = new Promise<string>(() => {})
  t.equal(await within(never, 5, () => 'late'), 'late')
  await t.rejects(within(never, 5, () => { throw new Error('too slow') }), { message: 'too slow' })
})

t.test('a rejection after the time is up is dropped, not left unhandled', async (t) => {
  let fail = (): void => {}
  const work = new Promise<string>((_resolve, reject) => { fail = () => reject(new Error('too late to matter')) })
  const unhandled: unknown[] = []
  const note = (reason: unknown): void => { unhandled.push(reason) }
  process.on('unhandledRejection', note)
  t.teardown(() => { process.off('unhandledRejection', note) })
  t.equal(await within(work, 5, () => 'late'), 'late')
  fail()
  await new Promise((resolve) => setImmediate(resolve))
  t.same(unhandled, [])
})

t.test('a time already past (a negative length) decides at once', async (t) => {
  t.equal(await within(new Promise<string>(() => {}), -100, () => 'late'), 'late')
})
