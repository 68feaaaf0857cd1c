/**
 * TurnsPerKey: the work given for one key runs one at a time, in the order
 * given, whatever the earlier work's outcome; other keys run meanwhile; the
 * pending count is what bounds a key's queue (job updates).
 */
import t from 'tap'
import { TurnsPerKey } from '../src/core/in-turns'

/** A promise the test settles. */
function gate (): { promise: Promise<void>, open: () => void, fail: () => void } {
  let open = (): void => {}
  let fail = (): void => {}
  const promise = new Promise<void>((resolve, reject) => {
    open = resolve
    fail = () => reject(new Error('failed on purpose'))
  })
  return { promise, open, fail }
}

t.test('one key: in turns and in order, a failure does not stop the next; another key runs meanwhile; pending counts and forgets', async (t) => {
  const turns = new TurnsPerKey()
  const order: string[] = []
  const gates = [gate(), gate(), gate()]
  const runs = gates.map(async (g, index) => await turns.run('job', async () => {
    order.push(`start ${index}`)
    await g.promise
    order.push(`end ${index}`)
    return index
  }))
  const other = turns.run('other', async () => 'other')
  t.equal(await other, 'other', 'another key is not held up')
  t.equal(turns.pending('job'), 3)
  t.same(order, ['start 0'], 'only the first runs')
  gates[0].fail()
  await t.rejects(runs[0], /on purpose/)
  await new Promise((resolve) => setImmediate(resolve))
  t.same(order, ['start 0', 'start 1'], 'the next starts after a failure')
  t.equal(turns.pending('job'), 2)
  gates[1].open()
  gates[2].open()
  t.same(await Promise.all(runs.slice(1)), [1, 2])
  t.same(order, ['start 0', 'start 1', 'end 1', 'start 2', 'end 2'])
  await new Promise((resolve) => setImmediate(resolve))
  t.equal(turns.pending('job'), 0)
  t.equal(turns.size, 0, 'nothing kept for keys with nothing pending')
})
