import type { AuthContext } from '../plugins/auth'
import { TOPIC_NAME, topicAllowed } from '../src/core/framing'
import { detachedCopy } from '../src/core/ids'
import { errors } from '../src/errors'

export const MAX_TOPICS_PER_REQUEST = 100

/** Validates topic names and the token's `topics` claim: 400 for a bad name or too many, 403 for one outside the claim. */
export function checkTopics (auth: AuthContext, topics: string[], max = MAX_TOPICS_PER_REQUEST): string[] {
  const limit = Math.min(max, MAX_TOPICS_PER_REQUEST)
  // A name given twice is one topic; the list's own length is bounded by the body or URL size.
  const distinct = [...new Set(topics)]
  if (distinct.length > limit) throw new errors.BadRequest(`at most ${limit} topics at once`)
  for (const topic of distinct) {
    if (!TOPIC_NAME.test(topic)) throw new errors.BadRequest('a topic name is 1-128 characters of A-Z a-z 0-9 _ . : / -')
    if (!topicAllowed(topic, auth.topics)) throw new errors.Forbidden(`the token does not allow topic ${topic}`)
  }
  return distinct
}

export function parseTopicList (raw: string | string[] | undefined): string[] {
  if (raw === undefined) return []
  return (Array.isArray(raw) ? raw.join(',') : raw).split(',').map((topic) => topic.trim()).filter((topic) => topic !== '').map(detachedCopy)
}
