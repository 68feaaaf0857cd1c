/**
 * The token's `topics` claim: `*` matches any run of characters. Matching is
 * checked against a regular expression on many generated cases, and a
 * pattern that makes a backtracking matcher take exponential time is
 * answered while the gateway stays responsive.
 */
import t from 'tap'
import { topicAllowed } from '../src/core/framing'
import { request, startGateway, userToken } from './helpers'

function reference (pattern: string, topic: string): boolean {
  const source = pattern.split('*').map((part) => part.replace(/[.*+?^${}()|[\]\\/]/g, '\\$&')).join('.*')
  return new RegExp(`^${source}$`, 's').test(topic)
}

t.test('wildcard patterns match as `*` = any run of characters', async (t) => {
  const cases: Array<[string, string, boolean]> = [
    ['news.*', 'news.sport', true],
    ['news.*', 'news.', true],
    ['news.*', 'news', false],
    ['*', '', true],
    ['*.x', 'a.b.x', true],
    ['*.x', 'a.b.xy', false],
    ['a*b*c', 'abc', true],
    ['a*b*c', 'acbc', true],
    ['a*b*c', 'acb', false],
    ['ab*ba', 'aba', false],
    ['ab*ba', 'abba', true],
    ['**', 'x', true],
    ['chat:*:admin', 'chat:room:admin', true],
    ['chat:*:admin', 'chat::admin', true],
    ['chat:*:admin', 'chat:admin', false],
    ['public', 'public', true],
    ['public', 'public-x', false]
  ]
  for (const [pattern, topic, expected] of cases) {
    t.equal(topicAllowed(topic, [pattern]), expected, `${pattern} ${expected ? 'matches' : 'does not match'} ${topic}`)
  }
  t.equal(topicAllowed('anything', null), true, 'no claim: every topic')
  t.equal(topicAllowed('b', ['a', 'b*']), true, 'any pattern of the list')

  // Small alphabets make near misses common, where a greedy matcher would go wrong.
  let seed = 7
  const random = (below: number): number => {
    seed = (seed * 1103515245 + 12345) % 2147483648
    return seed % below
  }
  const word = (alphabet: string, length: number): string => Array.from({ length }, () => alphabet[random(alphabet.length)]).join('')
  let disagreements = 0
  let matches = 0
  for (let round = 0; round < 20_000; round++) {
    const pattern = word('ab*', 1 + random(7))
    const topic = word('ab', random(9))
    const expected = reference(pattern, topic)
    if (expected) matches++
    if (topicAllowed(topic, [pattern]) !== expected) disagreements++
  }
  t.equal(disagreements, 0, 'agrees with a regular expression on 20,000 generated cases')
  t.ok(matches > 1000 && matches < 19_000, `both outcomes well represented (${matches} matches)`)
})

t.test('a pattern with many stars against a near-miss topic is answered, and the gateway stays responsive', async (t) => {
  const { url } = await startGateway(t)
  // A backtracking matcher tries every way of splitting 128 characters among
  // ten stars before failing on the last `b`.
  const token = userToken('u1', { topics: [`*${'a*'.repeat(10)}b`] })
  const topic = 'a'.repeat(128)
  const subscribe = request(`${url}/v1/subscriptions`, { method: 'POST', token, body: { topics: [topic] } })
  const opened = request(`${url}/v1/stream?token=${token}&topics=${topic}`)
  const health = await request(`${url}/health`)
  t.equal(health.status, 200, '/health answers meanwhile')
  const [subscribed, open] = await Promise.all([subscribe, opened])
  t.equal(subscribed.status, 403)
  t.match(subscribed.json, { statusCode: 403, error: 'Forbidden', message: String })
  t.equal(open.status, 403)
  const matching = await request(`${url}/v1/subscriptions`, { method: 'POST', token, body: { topics: [`${'a'.repeat(20)}b`] } })
  t.equal(matching.status, 200, 'a topic the pattern allows is accepted')
})
