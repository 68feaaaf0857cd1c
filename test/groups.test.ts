import t from 'tap'
import { Groups } from '../src/core/groups'

interface Member { name: string }

t.test('a key holds one member alone, several in a Set, and goes when the last leaves', async (t) => {
  const groups = new Groups<Member>()
  const a = { name: 'a' }
  const b = { name: 'b' }
  groups.add('k', a)
  groups.add('k', a)
  t.equal(groups.count('k'), 1, 'adding the same member twice keeps one')
  t.equal(groups.lookup('k'), a, 'a lone member is held as is')
  groups.add('k', b)
  t.ok(groups.lookup('k') instanceof Set, 'two members share a Set')
  t.same(groups.members('k').map((member) => member.name).sort(), ['a', 'b'])
  t.same([...groups.counts()], [['k', 2]])
  t.equal(groups.delete('k', { name: 'a' }), false, 'an equal-looking object is not the member')
  t.equal(groups.delete('k', a), true)
  t.equal(groups.lookup('k'), b, 'back to a lone member')
  t.equal(groups.delete('k', a), false, 'deleting twice says so')
  t.equal(groups.delete('k', b), true)
  t.equal(groups.has('k'), false)
  t.equal(groups.size, 0)
  t.equal(groups.count('k'), 0)
  t.same(groups.members('k'), [])
})

t.test('a loop over a group reaches every member even when one leaves during it', async (t) => {
  const groups = new Groups<Member>()
  const members = [{ name: 'a' }, { name: 'b' }]
  for (const member of members) groups.add('k', member)
  const reached: string[] = []
  const group = groups.lookup('k')
  t.ok(group instanceof Set)
  for (const member of group as Set<Member>) {
    reached.push(member.name)
    // The first one closes while being written to, leaving one member.
    if (member.name === 'a') groups.delete('k', member)
  }
  t.same(reached, ['a', 'b'])
  t.equal(groups.lookup('k'), members[1])
})
