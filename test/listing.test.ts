import t from 'tap'
import { infoFields, selectConnections } from '../src/core/listing'
import type { ConnectionInfo } from '../src/core/registry'

// The newest N are kept in one pass rather than by a sort of every stream;
// they must be exactly what the sort would give, ties included.
t.test('limit: the same streams, in the same order, as a full sort newest first (ties by id)', async (t) => {
  let seed = 7
  const random = (below: number): number => {
    seed = (seed * 1103515245 + 12345) % 2147483648
    return seed % below
  }
  for (const [count, limit, spread] of [[1000, 10, 100_000], [1000, 999, 100_000], [5000, 500, 20], [50, 50, 5], [50, 80, 5], [3, 1, 1]]) {
    const infos: ConnectionInfo[] = Array.from({ length: count }, (_, i) => ({
      connectionId: `c_${random(1_000_000).toString(36)}_${i}`,
      userId: `u${i % 7}`,
      topics: [],
      // Few distinct times where `spread` is small, so ties are many.
      openedAt: new Date(1_700_000_000_000 + random(spread)).toISOString(),
      instance: 'i1'
    }))
    const expected = [...infos].sort((a, b) => a.openedAt !== b.openedAt
      ? (a.openedAt < b.openedAt ? 1 : -1)
      : (a.connectionId < b.connectionId ? -1 : 1)).slice(0, limit)
    const { items, total } = selectConnections(infos, (info) => info.instance, infoFields, { limit })
    t.same(items.map((info) => info.connectionId), expected.map((info) => info.connectionId), `${count} streams, limit ${limit}, ${spread} distinct ms`)
    t.equal(total, count)
  }
})
