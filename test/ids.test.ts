import t from 'tap'
import { newConnectionId } from '../src/core/ids'

t.test('stream ids are URL-safe, 96 random bits, and never repeat across many refills of the random pool', async (t) => {
  const seen = new Set<string>()
  const count = 20_000
  for (let index = 0; index < count; index++) seen.add(newConnectionId())
  t.equal(seen.size, count, 'no id repeats')
  const shapes = [...seen].filter((id) => !/^c_[A-Za-z0-9_-]{16}$/.test(id))
  t.same(shapes, [], 'every id is c_ and 16 base64url characters (12 bytes)')
  // Each id's 12 bytes are fresh: over 20,000 ids every base64url symbol turns up at every position.
  for (let position = 2; position < 18; position++) {
    const symbols = new Set([...seen].map((id) => id[position]))
    t.ok(symbols.size >= 60, `position ${position} takes ${symbols.size} of 64 symbols`)
  }
})
