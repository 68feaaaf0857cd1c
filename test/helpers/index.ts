/** Embedded-mode and mode-agnostic helpers; Redis ones live in ./redis. */
export * from './gateway'
export * from './http'
export * from './process'
export * from './sse'
export * from './tokens'
export * from './modes'
