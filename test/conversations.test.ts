/**
 * Conversations and presence (seed 002): member lists, publish to a
 * conversation, membership changes on open streams, replay of conversation
 * events, `user:online`/`user:offline` and GET /v1/presence. Every test runs
 * in embedded and Redis mode; in Redis mode the members sit on two instances.
 */
import { setTimeout as delay } from 'node:timers/promises'
import t from 'tap'
import { eventually, request, userToken, type SseEvent } from './helpers'
import {
  connect, dataOf, increasing, members, namesOf, pair, presence, publishTo, PUBLISHER, settle, setMembers
} from './helpers/channels'
import { forEachMode } from './helpers/modes'
import { openStream } from './helpers/sse'

const sorted = (values: string[]): string[] => [...values].sort()
// The reconnect within the grace must be done inside it: a loaded machine
// (the suite runs two files at once) takes well over half a second for it.
const GRACE_MS = 2000

function presenceAbout (events: SseEvent[], userId: string): SseEvent[] {
  return events.filter((event) => (event.event === 'user:online' || event.event === 'user:offline') && dataOf<{ userId: string }>(event).userId === userId)
}

forEachMode(t, 'PUT, POST and DELETE /v1/conversations/:id/members replace, add and remove members and answer the list', async (t, mode) => {
  const [a, b] = await pair(t, mode)
  const put = await members(a, 'room-1', 'PUT', ['alice', 'bob', 'alice'])
  t.equal(put.status, 200)
  t.same(sorted(put.json.members), ['alice', 'bob'])
  t.same(sorted((await members(b, 'room-1', 'POST', ['carol'])).json.members), ['alice', 'bob', 'carol'], 'POST adds (seen from the other instance)')
  t.same(sorted((await members(a, 'room-1', 'DELETE', ['alice', 'nobody'])).json.members), ['bob', 'carol'], 'DELETE removes')
  t.same((await members(b, 'room-1', 'PUT', ['dave'])).json.members, ['dave'], 'PUT replaces')
  t.same((await members(a, 'room-1', 'PUT', [])).json.members, [], 'PUT [] empties')

  const forbidden = await members(a, 'room-1', 'PUT', ['eve'], userToken('eve'))
  t.equal(forbidden.status, 403, 'a user token may not change members')
  t.match(forbidden.json, { statusCode: 403, error: 'Forbidden' })
  t.equal((await members(a, 'room-1', 'POST', [])).status, 400, 'POST needs at least one member')
  t.equal((await members(a, 'room-1', 'DELETE', [])).status, 400, 'DELETE needs at least one member')
  const notList = await request(`${a.url}/v1/conversations/room-1/members`, { method: 'PUT', token: PUBLISHER, body: { members: 'alice' } })
  t.equal(notList.status, 400)
  const badId = await request(`${a.url}/v1/conversations/bad%20id/members`, { method: 'PUT', token: PUBLISHER, body: { members: ['alice'] } })
  t.equal(badId.status, 400, 'a conversation id with a space is refused')
})

forEachMode(t, 'an event to a conversation reaches every stream of every member, and no one else', async (t, mode) => {
  const [a, b] = await pair(t, mode)
  await setMembers(a, 'room-1', ['alice', 'bob'])
  const aliceTab1 = await connect(t, a, 'alice')
  const aliceTab2 = await connect(t, b, 'alice')
  const bob = await connect(t, b, 'bob')
  const carol = await connect(t, a, 'carol')
  const carolOnB = await connect(t, b, 'carol')

  const message = { conversationId: 'room-1', message: { id: 'msg789', text: 'Hello everyone!', senderId: 'bob' } }
  const id = await publishTo(a, { to: { conversation: 'room-1' }, event: 'message:new', data: message })
  for (const tab of [aliceTab1, aliceTab2, bob]) {
    const event = await tab.stream.nextEvent('message:new')
    t.equal(event.id, id)
    t.same(dataOf(event), message)
  }
  t.same(namesOf(await settle(a, carol.stream, carol.connectionId)), [], 'a non-member receives nothing')
  t.same(namesOf(await settle(b, carolOnB.stream, carolOnB.connectionId)), [], 'on either instance')
  t.same(namesOf(await settle(a, aliceTab1.stream, aliceTab1.connectionId)), [], 'a member receives it once')
})

forEachMode(t, 'membership changes take effect for streams already open', async (t, mode) => {
  const [a, b] = await pair(t, mode)
  await setMembers(a, 'room-2', ['alice'])
  const alice = await connect(t, a, 'alice')
  const dave = await connect(t, b, 'dave')

  const before = await publishTo(a, { to: { conversation: 'room-2' }, event: 'message:new', data: { n: 1 } })
  t.equal((await alice.stream.nextEvent('message:new')).id, before)
  t.same(namesOf(await settle(b, dave.stream, dave.connectionId)), [], 'dave is not a member yet')

  t.same(sorted((await members(b, 'room-2', 'POST', ['dave'])).json.members), ['alice', 'dave'])
  const joined = await publishTo(a, { to: { conversation: 'room-2' }, event: 'message:new', data: { n: 2 } })
  t.equal((await dave.stream.nextEvent('message:new')).id, joined, 'once added, his open stream receives')

  t.same((await members(a, 'room-2', 'DELETE', ['dave'])).json.members, ['alice'])
  const left = await publishTo(b, { to: { conversation: 'room-2' }, event: 'message:new', data: { n: 3 } })
  t.same(namesOf(await settle(b, dave.stream, dave.connectionId)), [], 'once removed, it receives nothing more')
  t.same((await alice.stream.next((event) => event.event === 'message:new' && event.id === left)).data, '{"n":3}')
})

forEachMode(t, 'a member reconnecting (to the other instance) with Last-Event-ID gets the conversation, topic and user events it missed, once, in order', async (t, mode) => {
  const [a, b] = await pair(t, mode)
  await setMembers(a, 'room-3', ['alice', 'bob'])
  await setMembers(a, 'elsewhere', ['bob', 'carol'])
  const first = await connect(t, a, 'alice', { topics: 'room-news' })
  const seen = await publishTo(a, { to: { conversation: 'room-3' }, event: 'message:new', data: { text: 'seen' } })
  t.equal((await first.stream.nextEvent('message:new')).id, seen)
  first.stream.close()

  const missed = [
    await publishTo(b, { to: { conversation: 'room-3' }, event: 'message:new', data: { text: 'missed 1' } }),
    await publishTo(a, { to: { topic: 'room-news' }, event: 'headline', data: { text: 'news' } }),
    await publishTo(b, { to: { conversation: 'room-3' }, event: 'user:typing', data: { userId: 'bob' } }),
    await publishTo(a, { to: { user: 'alice' }, event: 'message:read', data: { messageId: 'm1' } })
  ]
  await publishTo(a, { to: { conversation: 'elsewhere' }, event: 'message:new', data: { text: 'not for alice' } })
  await publishTo(b, { to: { topic: 'other-news' }, event: 'headline', data: { text: 'not for alice' } })

  const back = await connect(t, b, 'alice', { topics: 'room-news', lastEventId: seen })
  const replayed = await back.stream.take(4)
  t.same(replayed.map((event) => event.id), missed, 'exactly the missed events, in id order')
  t.same(replayed.map((event) => event.event), ['message:new', 'headline', 'user:typing', 'message:read'])
  t.equal(back.stream.lastEventId, missed[3], 'the browser cursor follows')
  const live = await publishTo(a, { to: { conversation: 'room-3' }, event: 'message:new', data: { text: 'live' } })
  t.equal((await back.stream.nextEvent('message:new')).id, live, 'then it continues live')
  t.same(namesOf(await settle(b, back.stream, back.connectionId)), [], 'no duplicate and nothing from elsewhere')
  t.ok(increasing([...replayed.map((event) => event.id), live]))
})

forEachMode(t, 'presence is announced to the members of the user\'s smallest conversations, at most MAX_PUBLISH_CHANNELS in all (a user cannot make it write more history for free); a conversation past that is left out', async (t, mode) => {
  const [a, b] = await pair(t, mode, { MAX_PUBLISH_CHANNELS: '3' })
  await setMembers(a, 'small', ['alice', 'bob', 'carol'])
  await setMembers(a, 'large', ['zed', 'm1', 'm2', 'm3', 'm4'])
  await setMembers(a, 'dm', ['zed', 'bob'])
  await setMembers(a, 'crowd', ['yan', 'bob', 'm1', 'm2', 'm3'])
  const bob = await connect(t, b, 'bob')
  const m1 = await connect(t, a, 'm1')
  await connect(t, a, 'alice')
  t.same(dataOf(await bob.stream.nextEvent('user:online')), { userId: 'alice' }, 'two members to tell: announced')
  await connect(t, a, 'zed')
  t.same(dataOf(await bob.stream.nextEvent('user:online')), { userId: 'zed' }, 'the member of his small conversation hears it')
  t.same(presenceAbout(await settle(a, m1.stream, m1.connectionId), 'zed'), [], 'the members of the conversation past the bound do not')
  await connect(t, a, 'yan')
  const told = [...presenceAbout(await settle(b, bob.stream, bob.connectionId), 'yan'), ...presenceAbout(await settle(a, m1.stream, m1.connectionId), 'yan')]
  t.same(told, [], 'a user whose only conversation is past the bound: nobody is told')
  t.same(await presence(b, 'yan'), { userId: 'yan', online: true, connections: 1 }, 'the user is online all the same')
  // Four others in all, but the second conversation adds only one new member to the first's two.
  await setMembers(a, 'g1', ['wes', 'bob', 'm2'])
  await setMembers(a, 'g2', ['wes', 'bob', 'm2', 'm1'])
  await connect(t, b, 'wes')
  t.same(dataOf(await m1.stream.nextEvent('user:online')), { userId: 'wes' }, 'members already told do not count twice against the bound')
})

forEachMode(t, 'presence: user:online when the first stream opens, nothing for more streams or a reconnect within the grace, user:offline after it, never to the user itself', async (t, mode) => {
  const [a, b] = await pair(t, mode, { PRESENCE_GRACE_MS: String(GRACE_MS) })
  await setMembers(a, 'dm', ['alice', 'bob'])
  await setMembers(a, 'group', ['alice', 'bob', 'carol'])
  await setMembers(a, 'unrelated', ['dave', 'erin'])
  const bob = await connect(t, b, 'bob')
  const dave = await connect(t, a, 'dave')
  t.same(await presence(a, 'alice'), { userId: 'alice', online: false, connections: 0 })

  const tab1 = await connect(t, a, 'alice')
  const online = await bob.stream.nextEvent('user:online')
  t.same(dataOf(online), { userId: 'alice' }, 'a member of her conversations hears user:online (from the other instance)')
  t.match(online.id, /^\d+$/, 'presence events are published events: they carry an id')
  t.same(namesOf(await settle(b, bob.stream, bob.connectionId)), [], 'once, though she shares two conversations with bob')
  t.same(namesOf(await settle(a, dave.stream, dave.connectionId)), [], 'no one outside her conversations hears of it')

  const tab2 = await connect(t, b, 'alice')
  t.same(await presence(b, 'alice'), { userId: 'alice', online: true, connections: 2 })
  t.same(namesOf(await settle(b, bob.stream, bob.connectionId)), [], 'a second stream announces nothing')

  tab1.stream.close()
  tab2.stream.close()
  let during = await presence(a, 'alice')
  await eventually(async () => {
    during = await presence(a, 'alice')
    return during.connections === 0
  }, 'both streams to be released')
  t.same(during, { userId: 'alice', online: true, connections: 0 }, 'during the grace: online, no live stream')

  const back = await connect(t, mode === 'redis' ? b : a, 'alice')
  t.same(await presence(a, 'alice'), { userId: 'alice', online: true, connections: 1 })
  // Waits past the first grace to show that no user:offline is still pending.
  await delay(GRACE_MS + 200)
  t.same(namesOf(await settle(b, bob.stream, bob.connectionId)), [], 'a reconnect within the grace sends nothing, then or later')

  back.stream.close()
  const offline = await bob.stream.nextEvent('user:offline', GRACE_MS + 5000)
  t.same(dataOf(offline), { userId: 'alice' })
  t.ok(BigInt(offline.id ?? '0') > BigInt(online.id ?? '0'))
  t.same(await presence(b, 'alice'), { userId: 'alice', online: false, connections: 0 })
  t.same(namesOf(await settle(b, bob.stream, bob.connectionId)), [], 'exactly one user:offline')

  for (const tab of [tab1, tab2, back]) t.same(presenceAbout(tab.stream.events, 'alice'), [], 'the user is never told of itself')
})

forEachMode(t, 'presence counts every stream of the cluster, job streams included', async (t, mode) => {
  const [a, b] = await pair(t, mode, { PRESENCE_GRACE_MS: String(GRACE_MS) })
  await setMembers(a, 'dm', ['alice', 'bob'])
  const bob = await connect(t, b, 'bob')
  const jobs = await openStream(`${a.url}/v1/jobs/stream`, { t, headers: { authorization: `Bearer ${userToken('alice')}` } })
  t.equal(jobs.status, 200)
  t.same(dataOf(await bob.stream.nextEvent('user:online')), { userId: 'alice' }, 'a job stream brings the user online')
  t.same(await presence(b, 'alice'), { userId: 'alice', online: true, connections: 1 })
  const tab = await connect(t, b, 'alice')
  t.same(await presence(a, 'alice'), { userId: 'alice', online: true, connections: 2 })
  jobs.close()
  await eventually(async () => (await presence(a, 'alice')).connections === 1, 'the job stream to be released')
  t.same(namesOf(await settle(b, bob.stream, bob.connectionId)), [], 'still online through the other stream: nothing sent')
  tab.stream.close()
  t.same(dataOf(await bob.stream.nextEvent('user:offline', GRACE_MS + 5000)), { userId: 'alice' })
})

forEachMode(t, 'presence events replay to a member who reconnects with Last-Event-ID', async (t, mode) => {
  const [a, b] = await pair(t, mode, { PRESENCE_GRACE_MS: String(GRACE_MS) })
  await setMembers(a, 'dm', ['alice', 'bob'])
  const bob = await connect(t, a, 'bob')
  const alice = await connect(t, b, 'alice')
  const online = await bob.stream.nextEvent('user:online')
  bob.stream.close()
  alice.stream.close()
  await eventually(async () => !(await presence(a, 'alice')).online, 'alice to go offline', GRACE_MS + 5000)
  const back = await connect(t, b, 'bob', { lastEventId: online.id })
  const offline = await back.stream.nextEvent('user:offline', 5000)
  t.same(dataOf(offline), { userId: 'alice' })
  t.same(namesOf(await settle(b, back.stream, back.connectionId)), [], 'once')
})

forEachMode(t, 'GET /v1/presence/:userId is a publisher route', async (t, mode) => {
  const [a] = await pair(t, mode)
  const answer = await request(`${a.url}/v1/presence/alice`, { token: userToken('alice') })
  t.equal(answer.status, 403)
  t.same(await presence(a, 'nobody'), { userId: 'nobody', online: false, connections: 0 })
})
