-- Prelude: the index of the PNGs kept in Redis (name -> size, name -> age) and their byte total.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function drop_png(name, png_prefix, copies_prefix, sizes, order, total)
  local size = tonumber(redis.call('HGET', sizes, name) or '0')
  redis.call('DEL', png_prefix .. name, copies_prefix .. name)
  redis.call('HDEL', sizes, name)
  redis.call('ZREM', order, name)
  if size > 0 then redis.call('DECRBY', total, size) end
end
