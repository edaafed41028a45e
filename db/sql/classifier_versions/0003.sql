-- Classifier versions with their offline test accuracy next to the untuned CLIP
-- baseline's on the same test examples (the paper's comparison), from the metrics that
-- training and `hps eval` record.
SELECT v.id,
       v.name,
       v.status,
       p.name AS parent,
       v.created_at,
       v.promoted_at,
       v.retired_at,
       (v.metrics #>> '{test,n}')::int AS test_examples,
       (v.metrics #>> '{test,chance}')::float8 AS chance,
       (v.metrics #>> '{test,top1}')::float8 AS top1,
       (v.metrics #>> '{test,top1_ci,0}')::float8 AS top1_low,
       (v.metrics #>> '{test,top1_ci,1}')::float8 AS top1_high,
       (v.metrics #>> '{test,pairwise}')::float8 AS pairwise,
       (v.metrics #>> '{compared,untuned,top1}')::float8 AS untuned_top1,
       (v.metrics #>> '{compared,untuned,pairwise}')::float8 AS untuned_pairwise,
       v.metrics
FROM model_versions v
LEFT JOIN model_versions p ON p.id = v.parent_id
WHERE v.kind = 'classifier'
