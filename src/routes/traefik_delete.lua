-- Deletes one route of tunnelbot's from traefik's Redis, if it is still the route the
-- reconciler read and judged ours, in one atomic step (traefik_redis.rs `delete`). It touches
-- only the keys it is given or can name from them, never SCANs: a script cannot be
-- interrupted, so its work must not grow with the keyspace.
--
-- KEYS[1]    the route's stamp (data/tunnelbot)
-- KEYS[2]    its target (<jh>/routes/<router>/target)
-- KEYS[3..]  the other keys its layout names (traefik_keys.rs `named_keys`)
-- ARGV[1]    the target the reconciler read, "http://<host>:<port>"
-- ARGV[2]    the router's key dir, ending in "/"
-- ARGV[3]    the service's key dir, ending in "/"
--
-- Returns the number of keys deleted; 0 when there is no stamp (absent, or the hub's own
-- route), -1 when the stamp is there but the target changed since the read: the hub rewrote
-- the path, and that route is left alone.

-- A key that is not a string is nobody's route value.
local function get(key)
    local v = redis.pcall("GET", key)
    if type(v) == "string" then
        return v
    end
    return nil
end

if get(KEYS[1]) ~= "true" then
    return 0
end
if get(KEYS[2]) ~= ARGV[1] then
    return -1
end

-- Checked: the route is still the one judged ours. Nothing is written above
-- this line, so an error there leaves the route whole.
local n = 0
for i = 1, #KEYS do
    n = n + redis.call("DEL", KEYS[i])
end
-- traefik's lists are numbered from 0 without gaps; item 0 is among KEYS. Another writer may
-- have made them longer, so delete on until an index is missing (bounded all the same).
local lists = {
    { ARGV[2] .. "entryPoints/", "" },
    { ARGV[3] .. "loadBalancer/servers/", "/url" },
}
for _, list in ipairs(lists) do
    for i = 1, 63 do
        local gone = redis.call("DEL", list[1] .. i .. list[2])
        if gone == 0 then
            break
        end
        n = n + gone
    end
end
return n
