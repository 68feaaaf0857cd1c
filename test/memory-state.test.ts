import t, { type Test } from 'tap'
import { MemoryBus } from '../src/core/memory-bus'
import { MemoryState } from '../src/core/memory-state'
import { Registry } from '../src/core/registry'

const HOUR_S = 3600

async function embeddedState (t: Test): Promise<MemoryState> {
  const bus = new MemoryBus({ historySize: 10, historyTtlS: HOUR_S })
  const state = new MemoryState(bus, new Registry('test-instance'), 0)
  t.teardown(async () => {
    await state.close()
    await bus.close()
  })
  return state
}

async function admit (state: MemoryState, connectionId: string, userId: string): Promise<void> {
  const admission = await state.admit({ connectionId, userId, topics: [], openedAt: Date.now(), limit: 100, policy: 'reject' })
  if (!admission.admitted) throw new Error(`${connectionId} not admitted`)
}

/** The periodic sweep, run now; it returns how many stream ids it read. */
function sweep (state: MemoryState): number {
  return state['sweep']()
}

t.test('a stream id belongs to its user while live, and for the window once closed', async (t) => {
  const state = await embeddedState(t)
  await admit(state, 'c_live', 'alice')
  t.equal(await state.connectionOwner('c_live'), 'alice', 'live')
  await state.release('c_live', 'mallory', HOUR_S)
  t.equal(await state.connectionOwner('c_live'), 'alice', 'a release by another user changes nothing')
  await state.release('c_live', 'alice', HOUR_S)
  t.equal(await state.connectionOwner('c_live'), 'alice', 'closed, inside the window')
  await state.release('c_gone', 'alice', 0)
  t.equal(await state.connectionOwner('c_gone'), null, 'an id never admitted has no owner')

  await state.createConnection('c_pre', 'bob', HOUR_S)
  t.equal(await state.connectionOwner('c_pre'), 'bob', 'pre-created')
  await state.createConnection('c_brief', 'bob', 0)
  t.equal(await state.connectionOwner('c_brief'), null, 'past its window')
})

t.test('the sweep reads the expired ids and one more, not every id in the window', async (t) => {
  const state = await embeddedState(t)
  for (let index = 0; index < 10; index++) {
    await admit(state, `c_old${index}`, 'alice')
    await state.release(`c_old${index}`, 'alice', 0)
  }
  for (let index = 0; index < 1000; index++) {
    await admit(state, `c_new${index}`, 'alice')
    await state.release(`c_new${index}`, 'alice', HOUR_S)
  }
  // Closed and expired, then reopened: live again, not the sweep's to forget.
  await admit(state, 'c_back', 'bob')
  await state.release('c_back', 'bob', 0)
  await admit(state, 'c_back', 'bob')

  t.equal(sweep(state), 11, 'the 10 expired ids and the first one still in its window')
  for (let index = 0; index < 10; index++) t.equal(state['closedOwners'].has(`c_old${index}`), false, `c_old${index} forgotten`)
  t.equal(await state.connectionOwner('c_new0'), 'alice', 'ids in the window stay')
  t.equal(await state.connectionOwner('c_new999'), 'alice')
  t.equal(await state.connectionOwner('c_back'), 'bob', 'the reopened id stays')
  t.equal(sweep(state), 1, 'nothing expired: one id read')

  // Closed again: it moves behind the ids closed before it, in expiry order.
  await state.release('c_back', 'bob', HOUR_S)
  t.equal([...state['closedOwners'].keys()].at(-1), 'c_back')
  t.equal(await state.connectionOwner('c_back'), 'bob')
})
